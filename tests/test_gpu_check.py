"""benchmarks/gpu_check.py, the script a lent GPU machine runs (torch only there), on CPU: gloo, a 2-layer model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_torch_and_rayuid_sdpo_only(tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["gpu_check.py", "--tiny", "--device", "cpu", "--seq", "64", "--batch", "2", "--buffer-mib", "4",
            "--bucket-mib", "1", "--steps", "2", "--out", str(out)]
    script = (f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, "
              "run_name='__main__'); heavy = [m for m in ('transformers', 'vllm', 'ray', 'pydantic', 'yaml') "
              "if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    learner, transport = report["learner"], report["transport"]
    assert learner["ranks"] == 1 and learner["tokens_per_step"] == 2 * 63 and learner["tokens_per_s"] > 0
    assert learner["mfu"] is None                                  # no peak is known for a CPU: none is claimed
    assert transport["mode"] == "gloo broadcast" and transport["bytes"] == 4 << 20
    assert transport["gb_per_s"] > 0 and transport["over_memcpy"] > 0
    source = report["publish_source"]                              # the device path sends what the host path did
    assert source["same_digest"] is True and source["device_path_s"] > 0 and source["host_round_trip_s"] > 0

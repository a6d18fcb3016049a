"""`ray job submit` of the smoke config against a Ray head this test starts (token auth on, as Ray 2.60 defaults)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), RAY_AUTH_MODE="token")
    ray = shutil.which("ray", path=env["PATH"])
    dash = _free_port()
    start = [ray, "start", "--head", "--num-cpus=2", f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--disable-usage-stats", "--include-dashboard=true"]
    subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=120)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_smoke_job_reaches_succeeded(ray_head, tmp_path):
    env, address = ray_head
    run_dir = tmp_path / "job_run"
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--no-wait", "--",
              "rayuid", "train", "jobs/smoke.yaml", f"run_dir={run_dir}"]
    for _ in range(12):  # a loaded machine may bring the head's job agent up after `ray start` returns
        out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(10)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"(raysubmit_\w+)", out.stdout + out.stderr).group(1)
    status = ""
    deadline = time.time() + 900
    while time.time() < deadline:
        proc = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env,
                              capture_output=True, text=True, timeout=120)
        status = proc.stdout + proc.stderr  # the ray CLI logs to stderr
        if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
            break
        time.sleep(5)
    logs = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=120).stdout
    assert re.search(r"succeeded", status, re.IGNORECASE), status + logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["interactions_trained_twice"] == 0

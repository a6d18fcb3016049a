"""Errors a user can expect are one `error: …` line and exit code 2; `-v` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayuid.config import OnlineSettings, field_docs

ROOT = Path(__file__).resolve().parents[1]


def _rayuid(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "rayuid.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("args, says", [
    (["extract", "missing.jsonl", "--out", "{tmp}/x.jsonl"], "input 'missing.jsonl' does not exist"),
    (["train", "jobs/nope.yaml"], "config file jobs/nope.yaml does not exist; the shipped configs are in jobs/"),
    (["train", "jobs/smoke.yaml", "optim.lr=-1"], "invalid config jobs/smoke.yaml:"),
    (["train", "jobs/smoke.yaml", "optim.lr"], "is not key=value"),
    (["train", "jobs/smoke.yaml", "ray.address=127.0.0.1:9", "run_dir={tmp}/run"], "no Ray cluster answers at"),
    (["train", "jobs/offline_smollm2_sample.yaml", "model.name=nobody/no-such-model", "run_dir={tmp}/run"],
     "model 'nobody/no-such-model' is not a local folder"),
])
def test_expected_errors_are_one_line(tmp_path, args, says):
    out = _rayuid(*[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and says in out.stderr.splitlines()[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_verbose_shows_the_traceback(tmp_path):
    out = _rayuid("-v", "extract", "missing.jsonl", "--out", str(tmp_path / "x.jsonl"))
    assert out.returncode != 0 and "Traceback" in out.stderr and "FileNotFoundError" in out.stderr
    late = _rayuid("extract", "missing.jsonl", "--out", str(tmp_path / "x.jsonl"), "--verbose")
    assert "Traceback" in late.stderr                              # the flag also works after the command


def test_config_schema_prints_every_field_without_ray_or_vllm():
    script = ("import sys; from rayuid.cli import main; code = main(['config', 'schema']); "
              "assert 'vllm' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines, rows = out.stdout.splitlines(), field_docs()
    assert len(lines) == len(rows) > 100
    for line, (path, kind, default, doc) in zip(lines, rows):
        assert line.split()[0] == path and line.endswith(f"  {kind}  {default}  — {doc}"), line
    staleness = next(line for line in lines if line.startswith("online.max_staleness "))
    meaning = " ".join(OnlineSettings.model_fields["max_staleness"].description.split())
    assert staleness.endswith(f"  int  0  — {meaning}") and "strictly on-policy" in meaning

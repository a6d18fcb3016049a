"""Ray runs whose ``run_dir`` is a bucket on a real S3-compatible server (moto's, on loopback): the driver
SIGKILLed mid-run and started again (with an empty node-local staging folder) resumes from the bucket with the
losses of an uninterrupted run; per-user adapters resume from the bucket; ``keep_last`` prunes the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rayuid.records import storage

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[1]
FP32 = ("model.compute_dtype=float32", "ray.vllm.dtype=float32")


def _train(uri: str, staging: Path, tiny_model_dir: str, *overrides: str, job: str = "smoke") -> subprocess.Popen:
    """``rayuid train jobs/<job>.yaml`` as its own process (and process group: its local Ray starts inside it)."""
    cmd = [str(Path(sys.executable).parent / "rayuid"), "train", f"jobs/{job}.yaml", f"run_dir={uri}",
           f"model.name={tiny_model_dir}", *FP32, *overrides]
    env = dict(os.environ, **{storage.STAGING_ENV: str(staging)})
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout_s: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        _stop_group(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _stop_group(proc: subprocess.Popen) -> None:
    """Everything the run started (its local Ray) is in its process group: stop it by that id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _lines(uri: str) -> list[str]:
    path = storage.join(uri, "metrics.jsonl")
    return storage.read_text(path).splitlines() if storage.exists(path) else []


def test_a_sigkilled_driver_resumes_from_the_bucket_with_the_losses_of_an_uninterrupted_run(
        s3_bucket, tmp_path, tiny_model_dir):
    steps = ("online.steps=5", "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    straight = s3_bucket + "/straight"
    _finish(_train(straight, tmp_path / "stage-a", tiny_model_dir, *steps))

    killed = s3_bucket + "/killed"
    proc = _train(killed, tmp_path / "stage-b", tiny_model_dir, *steps)
    deadline = time.time() + 600
    while len(_lines(killed)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    before = _lines(killed)
    os.kill(proc.pid, signal.SIGKILL)                               # the driver, mid-run (step 4 under way)
    _stop_group(proc)
    assert len(before) >= 3 and storage.exists(killed + "/checkpoints/step-000002/driver_state.json")
    assert not storage.exists(killed + "/summary.json")

    _finish(_train(killed, tmp_path / "stage-c", tiny_model_dir, *steps))  # a fresh staging folder: all from S3
    after = _lines(killed)
    assert after[:2] == before[:2]                                  # steps 1-2 kept from the first attempt: resumed
    loss = lambda lines: [json.loads(ln)["loss"] for ln in lines]  # noqa: E731
    assert loss(after) == pytest.approx(loss(_lines(straight)), abs=1e-5)
    summary = json.loads(storage.read_text(killed + "/summary.json"))
    assert summary["steps_done"] == 5 and summary["interactions_trained_twice"] == 0
    assert summary["run_dir"] == killed and summary["checkpoint"] == killed + "/checkpoints/step-000005"
    ledger = json.loads(storage.read_text(killed + "/ledger.json"))
    ids = [i for step in ledger.values() for i in step]
    assert sorted(int(k) for k in ledger) == [1, 2, 3, 4, 5] and len(ids) == len(set(ids)) == 20
    samples = storage.read_text(killed + "/samples.jsonl").splitlines()
    assert sorted(json.loads(s)["step"] for s in samples) == sorted([1, 2, 3, 4, 5] * 4)
    assert storage.listdir(killed + "/checkpoints") == ["step-000004", "step-000005"]   # keep_last, in the bucket
    assert storage.exists(killed + "/checkpoints/step-000005/hf/model.safetensors")


def test_a_per_user_run_resumes_every_users_adapter_from_the_bucket(s3_bucket, tmp_path, tiny_model_dir):
    uri = s3_bucket + "/personal"
    users = ("checkpoint.every_steps=2", "checkpoint.keep_last=1", "online.eval_every=2")
    _finish(_train(uri, tmp_path / "stage-a", tiny_model_dir, "online.steps=2", *users, job="smoke_users"))
    first = json.loads(storage.read_text(uri + "/checkpoints/step-000002/driver_state.json"))
    assert first["versions"] == {"ann": 2, "ben": 2, "cat": 2}
    _finish(_train(uri, tmp_path / "stage-b", tiny_model_dir, "online.steps=4", *users, job="smoke_users"))
    summary = json.loads(storage.read_text(uri + "/summary.json"))
    assert summary["steps_done"] == 4 and summary["interactions_trained_twice"] == 0
    state = json.loads(storage.read_text(uri + "/checkpoints/step-000004/driver_state.json"))
    assert state["versions"] == {"ann": 4, "ben": 4, "cat": 4}      # resumed at v2, two more steps each
    metrics = [json.loads(ln) for ln in _lines(uri)]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[2]["users"]["ann"]["version"] == 3
    for user in ("ann", "ben", "cat"):
        assert storage.listdir(f"{uri}/adapters/{user}") == ["v000004"]   # keep_last=1 pruned the bucket
        assert summary["adapters"][user] == f"{uri}/adapters/{user}/v000004"
    assert storage.listdir(uri + "/checkpoints") == ["step-000004"]
    assert storage.exists(uri + "/results.json") and storage.exists(uri + "/results.png")
    # rayuid export from the bucket: the adapter as PEFT saved it, and merged into its base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayuid.offline.export import export
    from rayuid.sdpo.models import load_causal_lm

    adapter = export(uri, tmp_path / "ann", user="ann")
    merged = export(uri, tmp_path / "ann-merged", user="ann", merge_lora=True)
    assert (adapter / "adapter_config.json").exists() and not (adapter / "adapter_state.pt").exists()
    full = AutoModelForCausalLM.from_pretrained(merged)
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir, "float32"), str(adapter)).merge_and_unload()
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), peft.state_dict().values()))

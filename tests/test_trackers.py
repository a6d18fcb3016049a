"""Experiment trackers (report_to): what they receive, read back from their own stores, offline."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from rayuid.records.trackers import Trackers, flatten

RECORDS = [{"step": s, "loss": 0.5 / s, "lr": 1e-5, "users": {"ann": {"loss": float(s), "persona": "concise"}},
            "gen_versions": [s - 1], "note": "x", "done": True} for s in (1, 2, 3)]


def test_flatten_keeps_numeric_leaves_under_slash_keys():
    assert flatten(RECORDS[1]) == {"step": 2.0, "loss": 0.25, "lr": 1e-5, "users/ann/loss": 2.0}
    assert flatten({"a": {"b": {"c": 1}}}, "eval/") == {"eval/a/b/c": 1.0}


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rayuid").experiment_id])
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@pytest.fixture()
def offline_trackers(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_every_tracker_gets_the_records_read_back(offline_trackers, monkeypatch):
    run_dir = offline_trackers
    (run_dir / "cwd").mkdir()
    monkeypatch.chdir(run_dir / "cwd")
    trackers = Trackers(["tensorboard", "mlflow", "wandb"], run_dir, "t", {"optim": {"lr": 1e-5}})
    for record in RECORDS:
        trackers.log(record["step"], record)
    trackers.log(3, {"adherence": 0.75, "win_rate_vs_base": {"rate": 0.9}}, prefix="eval/")
    import matplotlib.pyplot as plt

    plt.plot([0, 1]), plt.savefig(run_dir / "p.png"), plt.close()
    trackers.images({"metrics": run_dir / "p.png", "missing": run_dir / "none.png"})
    trackers.close()
    scalars = _tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["loss"] == [(1, 0.5), (2, 0.25), (3, pytest.approx(1 / 6))]
    assert scalars["users/ann/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars["eval/win_rate_vs_base/rate"] == [(3, pytest.approx(0.9))] and "note" not in scalars
    assert _mlflow_history(run_dir, "users/ann/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert _mlflow_history(run_dir, "eval/adherence") == [(3, 0.75)]
    assert glob.glob(str(run_dir / "mlflow-artifacts" / "*" / "artifacts" / "plots" / "p.png"))  # the run's, not
    assert os.listdir(run_dir / "cwd") == []                                                     # ./mlruns
    (wandb_run,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))   # W&B offline: for wandb sync
    assert os.path.getsize(wandb_run) > 0


def test_the_offline_trainer_reports_what_metrics_jsonl_holds(offline_trackers, tiny_model_dir):
    from rayuid.config import TrainConfig
    from rayuid.offline.trainer import train

    run_dir = offline_trackers / "run"
    cfg = TrainConfig.model_validate({
        "run_dir": str(run_dir), "seed": 3, "threads": 1, "model": {"name": tiny_model_dir},
        "report_to": ["tensorboard", "mlflow"], "template": {"max_prompt_tokens": 128, "max_response_tokens": 48},
        "optim": {"lr": 1e-3, "micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 3, "warmup_ratio": 0.0},
        "checkpoint": {"every_steps": None, "save_final": False}})
    train(cfg)
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert _tensorboard_scalars(run_dir / "tensorboard")["loss"] == losses
    assert _mlflow_history(run_dir, "loss") == losses


def test_a_tracker_that_fails_to_start_closes_the_ones_already_open(offline_trackers, monkeypatch):
    from rayuid.records import trackers as module

    closed = []

    class Broken:
        def __init__(self, *args):
            raise RuntimeError("no such tracker server")

    real = module._TensorBoard
    monkeypatch.setattr(module, "_TensorBoard", type("TB", (real,), {"close": lambda self: closed.append(1)}))
    monkeypatch.setattr(module, "_Wandb", Broken)
    with pytest.raises(RuntimeError, match="no such tracker server"):
        Trackers(["tensorboard", "wandb"], offline_trackers, "t", {})
    assert closed == [1]

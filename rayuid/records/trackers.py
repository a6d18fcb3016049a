"""Experiment trackers (``report_to: [tensorboard, wandb, mlflow]``): every record ``metrics.jsonl`` gets, the
held-out evaluation points (``eval/…``) and the run's plots as images, through each tracker's own client.

Where each writes, from the standard settings of each tool:

- tensorboard: ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``);
- mlflow: ``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``RUN_DIR/mlflow.db`` (``mlflow ui --backend-store-uri
  sqlite:///RUN_DIR/mlflow.db``) with artifacts in ``RUN_DIR/mlflow-artifacts``; experiment ``MLFLOW_EXPERIMENT_NAME``
  or "rayuid";
- wandb: project ``WANDB_PROJECT`` or "rayuid", files under ``RUN_DIR``; ``WANDB_MODE=offline`` (or no API key)
  logs locally for a later ``wandb sync``.

Nested records are flattened with "/" (``users/ann/loss``); values that are not numbers are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

NAMES = ("tensorboard", "wandb", "mlflow")


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Pure: numeric leaves of a nested record under "/"-joined keys (bools and non-numbers dropped)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, name: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import mlflow

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rayuid")
        if os.environ.get("MLFLOW_TRACKING_URI"):  # a tracking server: it decides where artifacts go
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        else:  # the run's own store; artifacts beside it (MLflow's default would be ./mlruns of the cwd)
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').absolute()}")
            if mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=(run_dir / "mlflow-artifacts").absolute().as_uri())
        mlflow.set_experiment(name)
        self.mlflow, self.run = mlflow, mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten_params(config).items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("@", "_"): v for k, v in values.items()}, step=step)

    def image(self, name: str, path: Path) -> None:
        self.mlflow.log_artifact(str(path), artifact_path="plots")

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rayuid"), name=run_name, dir=str(run_dir),
                              config=config, mode=mode, reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


def flatten_params(config: dict, prefix: str = "") -> dict[str, object]:
    """Pure: leaves of a nested config under "."-joined keys (what a tracker shows as run parameters)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Trackers:
    """The run's trackers, written to together; empty (every call a no-op) when ``report_to`` is empty."""

    def __init__(self, names: list[str], run_dir: str | Path, run_name: str, config: dict):
        kinds = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
        self.open = []
        try:
            for name in dict.fromkeys(names):
                self.open.append(kinds[name](Path(run_dir), run_name, config))
        except BaseException:
            self.close()  # those already open (an active MLflow run would block the next start_run)
            raise

    def log(self, step: int, record: dict, prefix: str = "") -> None:
        values = flatten(record, prefix)
        for tracker in self.open:
            tracker.log(step, values)

    def images(self, paths: dict[str, str | Path | None]) -> None:
        for name, path in paths.items():
            if path and Path(path).is_file():
                for tracker in self.open:
                    tracker.image(name, Path(path))

    def close(self) -> None:
        """Close every tracker, each on its own: one that fails to flush does not keep the others open."""
        trackers, self.open, failed = self.open, [], None
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001 - re-raised once all are closed
                failed = failed or err
        if failed is not None:
            raise failed

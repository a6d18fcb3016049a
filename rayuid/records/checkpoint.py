"""Checkpoints that transformers, peft and vLLM load directly, plus everything needed to resume exactly.

Layout: ``RUN_DIR/checkpoints/step-000012/`` holding the model (``save_pretrained``: safetensors, or a PEFT adapter)
and its tokenizer, and ``trainer_state.pt`` (optimizer, scheduler, RNG states, step, data position, teacher shadow).
Each checkpoint is written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rayuid.records.atomic import atomic_folder

STATE_FILE = "trainer_state.pt"
DRIVER_STATE = "driver_state.json"  # a Ray run's checkpoint: the driver's state, written last (marks it complete)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path, marker: str = STATE_FILE) -> list[Path]:
    """Complete checkpoints (those holding ``marker``), oldest first; a temp folder never matches ``step-N``."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / marker).exists()]


def latest_checkpoint(run_dir: str | Path, marker: str = STATE_FILE) -> Path | None:
    found = list_checkpoints(run_dir, marker)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int, marker: str = STATE_FILE) -> None:
    """Keep only the newest ``keep_last`` complete checkpoints."""
    for old in list_checkpoints(run_dir, marker)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, state: dict, keep_last: int = 2) -> Path:
    """Write ``step-N`` atomically and keep only the newest ``keep_last`` checkpoints."""
    final = step_dir(run_dir, step)
    with atomic_folder(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(dict(state, step=step, rng=rng_state()), tmp / STATE_FILE)
    prune_checkpoints(run_dir, keep_last)
    return final


def load_trainer_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=False)

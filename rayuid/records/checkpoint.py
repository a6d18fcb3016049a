"""Checkpoints that transformers, peft and vLLM load directly, plus everything needed to resume exactly.

Layout: ``RUN_DIR/checkpoints/step-000012/`` holding the model (``save_pretrained``: safetensors, or a PEFT adapter)
and its tokenizer, and ``trainer_state.pt`` (optimizer, scheduler, RNG states, step, data position, teacher shadow).
Each checkpoint is written to a temporary folder and renamed into place (or, when ``run_dir`` is a URI, uploaded
with its marker file last: ``rayuid.records.storage``), so a crash never leaves a half checkpoint that counts.
Checkpoints are named by their location: a local path or a URI, as a str.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from rayuid.records import storage

STATE_FILE = "trainer_state.pt"
DRIVER_STATE = "driver_state.json"  # a Ray run's checkpoint: the driver's state, written last (marks it complete)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> str:
    return storage.join(run_dir, "checkpoints")


def step_dir(run_dir: str | Path, step: int) -> str:
    return storage.join(checkpoints_dir(run_dir), f"step-{step:06d}")


def list_checkpoints(run_dir: str | Path, marker: str = STATE_FILE) -> list[str]:
    """Complete checkpoints (those holding ``marker``), oldest first; a temp folder never matches ``step-N``."""
    root = checkpoints_dir(run_dir)
    found = sorted((int(m.group(1)), storage.join(root, name)) for name in storage.listdir(root)
                   if (m := _STEP_DIR.match(name)))
    return [p for _, p in found if storage.exists(storage.join(p, marker))]


def latest_checkpoint(run_dir: str | Path, marker: str = STATE_FILE) -> str | None:
    found = list_checkpoints(run_dir, marker)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int, marker: str = STATE_FILE) -> None:
    """Keep only the newest ``keep_last`` complete checkpoints."""
    for old in list_checkpoints(run_dir, marker)[:-keep_last]:
        storage.delete(old)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, state: dict, keep_last: int = 2) -> str:
    """Write ``step-N`` atomically (locally: a renamed temp folder; a URI: uploaded, ``STATE_FILE`` last) and keep
    only the newest ``keep_last`` checkpoints."""
    final = step_dir(run_dir, step)
    with storage.atomic_folder(final, marker=STATE_FILE, prefix="ckpt") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(dict(state, step=step, rng=rng_state()), tmp / STATE_FILE)
    prune_checkpoints(run_dir, keep_last)
    return final


def load_trainer_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=False)

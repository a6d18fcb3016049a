"""``rayuid export``: a run's weights as a folder that transformers, peft and vLLM load, for serving.

    rayuid export RUN_DIR [--step N] [--user ID] --to DIR [--merge-lora]

What a run holds, by kind (all found through the newest complete checkpoint, or ``--step N``):

- offline trainer: ``checkpoints/step-N/`` is a ``save_pretrained`` folder (full model or PEFT adapter);
- Ray system: ``checkpoints/step-N/hf/`` (the learner's HF export: full model or PEFT adapter);
- per-user run: ``adapters/<user>/v<version>/``, the version that ``checkpoints/step-N/driver_state.json`` names.

The folder written holds the model (or adapter) and the tokenizer, and nothing of rayuid's resume state.
``--merge-lora`` folds an adapter into its base model (``model.name`` of the run's ``config.yaml``) and writes a full
model. Written to a temporary folder beside ``DIR`` and renamed, so a failure never leaves half an export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rayuid.records import checkpoint as ckpt
from rayuid.records.atomic import atomic_folder

DRIVER_STATE = ckpt.DRIVER_STATE  # written by the Ray driver's checkpoints (rayuid.system.policy)
RESUME_ONLY = {ckpt.STATE_FILE, "adapter_state.pt", DRIVER_STATE}  # rayuid's resume state: not for serving


class ExportError(ValueError):
    """The run holds nothing to export as asked; the message says what exists."""


def _step_dir(run_dir: Path, step: int | None) -> Path:
    found = ckpt.list_checkpoints(run_dir, marker=ckpt.STATE_FILE) + ckpt.list_checkpoints(run_dir, marker=DRIVER_STATE)
    if not found:
        raise ExportError(f"{run_dir} has no complete checkpoint under checkpoints/ (was checkpoint.every_steps or "
                          "the final save off?)")
    if step is None:
        return max(found, key=lambda p: p.name)
    chosen = ckpt.step_dir(run_dir, step)
    if chosen not in found:
        raise ExportError(f"{run_dir} has no complete checkpoint at step {step}; it has steps "
                          f"{sorted(int(p.name.split('-')[1]) for p in found)}")
    return chosen


def source_folder(run_dir: str | Path, step: int | None = None, user: str | None = None) -> Path:
    """The HF folder (full model or PEFT adapter) that holds the asked-for weights."""
    run_dir = Path(run_dir)
    step_dir = _step_dir(run_dir, step)
    state = step_dir / DRIVER_STATE
    versions = json.loads(state.read_text()).get("versions") if state.exists() else None
    if versions is not None:  # a per-user run
        if user is None or user not in versions:
            raise ExportError(f"{run_dir} is a per-user run: pass --user, one of {sorted(versions)}")
        folder = run_dir / "adapters" / user / f"v{versions[user]:06d}"
        if versions[user] == 0 or not folder.is_dir():
            raise ExportError(f"user {user!r} has no trained adapter at {step_dir.name} (version {versions[user]})")
        return folder
    if user is not None:
        raise ExportError(f"{run_dir} trains one policy, not per-user adapters: drop --user")
    return step_dir / "hf" if (step_dir / "hf").is_dir() else step_dir


def export(run_dir: str | Path, to: str | Path, step: int | None = None, user: str | None = None,
           merge_lora: bool = False) -> Path:
    """Write the weights to ``to``; returns it. See the module docstring for what is found where."""
    run_dir, to = Path(run_dir), Path(to)
    if run_dir.resolve() == to.resolve() or run_dir.resolve().is_relative_to(to.resolve()):
        raise ExportError(f"--to {to} is (or holds) the run being exported, and it would be replaced: pick another "
                          "folder")
    folder = source_folder(run_dir, step, user)
    is_adapter = (folder / "adapter_config.json").exists()
    with atomic_folder(to) as tmp:
        if merge_lora and is_adapter:
            _merge(folder, _base_model(run_dir), tmp)
        else:
            for item in folder.iterdir():
                if item.name not in RESUME_ONLY and item.is_file():
                    shutil.copy2(item, tmp / item.name)
        _tokenizer(run_dir, folder, tmp)
    return to


def _base_model(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if not config.exists():
        raise ExportError(f"{run_dir} has no config.yaml: cannot tell which base model the adapter belongs to")
    return yaml.safe_load(config.read_text())["model"]["name"]


def _merge(adapter: Path, base_name: str, out: Path) -> None:
    from peft import PeftModel

    from rayuid.sdpo.models import load_causal_lm, resolve_model

    base = load_causal_lm(resolve_model(base_name), "float32")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


def _tokenizer(run_dir: Path, folder: Path, out: Path) -> None:
    """The tokenizer travels with the weights; per-user adapters carry none, so it comes from the base model."""
    if (out / "tokenizer_config.json").exists():
        return
    from rayuid.sdpo.models import load_tokenizer, resolve_model

    load_tokenizer(resolve_model(_base_model(run_dir))).save_pretrained(out)

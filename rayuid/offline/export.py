"""``rayuid export``: a run's weights as a folder that transformers, peft and vLLM load, for serving.

    rayuid export RUN_DIR [--step N] [--user ID] --to DIR [--merge-lora]

What a run holds, by kind (all found through the newest complete checkpoint, or ``--step N``):

- offline trainer: ``checkpoints/step-N/`` is a ``save_pretrained`` folder (full model or PEFT adapter);
- Ray system: ``checkpoints/step-N/hf/`` (the learner's HF export: full model or PEFT adapter);
- per-user run: ``adapters/<user>/v<version>/``, the version that ``checkpoints/step-N/driver_state.json`` names.

The folder written holds the model (or adapter) and the tokenizer, and nothing of rayuid's resume state.
``--merge-lora`` folds an adapter into its base model (``model.name`` of the run's ``config.yaml``) and writes a full
model. ``RUN_DIR`` is a local path or a URI (``s3://…``: downloaded first). Written to a temporary folder beside
``DIR`` and renamed, so a failure never leaves half an export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rayuid.records import checkpoint as ckpt
from rayuid.records import storage
from rayuid.records.atomic import atomic_folder

DRIVER_STATE = ckpt.DRIVER_STATE  # written by the Ray driver's checkpoints (rayuid.system.policy)
RESUME_ONLY = {ckpt.STATE_FILE, "adapter_state.pt", DRIVER_STATE}  # rayuid's resume state: not for serving


class ExportError(ValueError):
    """The run holds nothing to export as asked; the message says what exists."""


def _step_dir(run_dir: str, step: int | None) -> str:
    found = ckpt.list_checkpoints(run_dir, marker=ckpt.STATE_FILE) + ckpt.list_checkpoints(run_dir, marker=DRIVER_STATE)
    if not found:
        raise ExportError(f"{run_dir} has no complete checkpoint under checkpoints/ (was checkpoint.every_steps or "
                          "the final save off?)")
    if step is None:
        return max(found, key=storage.basename)
    chosen = ckpt.step_dir(run_dir, step)
    if chosen not in found:
        raise ExportError(f"{run_dir} has no complete checkpoint at step {step}; it has steps "
                          f"{sorted(int(storage.basename(p).split('-')[1]) for p in found)}")
    return chosen


def source_folder(run_dir: str | Path, step: int | None = None, user: str | None = None) -> str:
    """Where the HF folder (full model or PEFT adapter) that holds the asked-for weights is (a path or a URI)."""
    run_dir = storage.join(run_dir)
    step_dir = _step_dir(run_dir, step)
    state = storage.join(step_dir, DRIVER_STATE)
    versions = json.loads(storage.read_text(state)).get("versions") if storage.exists(state) else None
    if versions is not None:  # a per-user run
        if user is None or user not in versions:
            raise ExportError(f"{run_dir} is a per-user run: pass --user, one of {sorted(versions)}")
        folder = storage.join(run_dir, "adapters", user, f"v{versions[user]:06d}")
        if versions[user] == 0 or not storage.exists(folder):
            raise ExportError(f"user {user!r} has no trained adapter at {storage.basename(step_dir)} (version {versions[user]})")
        return folder
    if user is not None:
        raise ExportError(f"{run_dir} trains one policy, not per-user adapters: drop --user")
    hf = storage.join(step_dir, "hf")
    return hf if storage.exists(hf) else step_dir


def export(run_dir: str | Path, to: str | Path, step: int | None = None, user: str | None = None,
           merge_lora: bool = False) -> Path:
    """Write the weights to ``to`` (a local folder; ``run_dir`` may be a URI); returns it. See the module
    docstring for what is found where."""
    run_dir, to = storage.join(run_dir), Path(to)
    if not storage.is_remote(run_dir) and Path(run_dir).resolve().is_relative_to(to.resolve()):  # is, or is in
        raise ExportError(f"--to {to} is (or holds) the run being exported, and it would be replaced: pick another "
                          "folder")
    location = source_folder(run_dir, step, user)
    base_name = _base_model(run_dir)
    with storage.local_copy(location, "export") as folder, atomic_folder(to) as tmp:
        if merge_lora and (folder / "adapter_config.json").exists():
            _merge(folder, base_name, tmp)
        else:
            for item in folder.iterdir():
                if item.name not in RESUME_ONLY and item.is_file():
                    shutil.copy2(item, tmp / item.name)
        _tokenizer(base_name, tmp)
    return to


def _base_model(run_dir: str) -> str | None:
    """``model.name`` from the run's config.yaml (None when the run has none)."""
    config = storage.join(run_dir, "config.yaml")
    return yaml.safe_load(storage.read_text(config))["model"]["name"] if storage.exists(config) else None


def _need_base(base_name: str | None) -> str:
    if base_name is None:
        raise ExportError("the run has no config.yaml: cannot tell which base model the adapter belongs to")
    return base_name


def _merge(adapter: Path, base_name: str, out: Path) -> None:
    from peft import PeftModel

    from rayuid.sdpo.models import load_causal_lm, resolve_model

    base = load_causal_lm(resolve_model(_need_base(base_name)), "float32")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


def _tokenizer(base_name: str | None, out: Path) -> None:
    """The tokenizer travels with the weights; per-user adapters carry none, so it comes from the base model."""
    if (out / "tokenizer_config.json").exists():
        return
    from rayuid.sdpo.models import load_tokenizer, resolve_model

    load_tokenizer(resolve_model(_need_base(base_name))).save_pretrained(out)

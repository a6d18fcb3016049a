"""Checkpoints of the sharded learner (``rayuid.system.learner.FsdpLearner``): exact resume plus an HF folder.

Layout of ``PATH``:

    dcp/               torch.distributed.checkpoint of the model (only the trainable adapter for LoRA), the AdamW
                       state and the teacher shadow: each rank writes its shard; loadable at any world size
    scheduler.pt       LR schedule state (identical on all ranks; rank 0 writes it)
    rng-<rank>.pt      each rank's RNG states
    learner.json       step, world size, LoRA or full, teacher mode (checked on load)
    driver_state.json  the driver's own state (``extra``), returned by ``load``
    hf/                ``save_pretrained`` of the full model or of the PEFT adapter, plus the tokenizer, so
                       transformers, peft and vLLM load it directly

``PATH`` is a local path or a URI (``rayuid.records.storage``). Local: every rank must see the same filesystem
(DCP writes one file per rank); everything is written to a sibling temp folder that rank 0 renames into place once
all ranks agree that they succeeded. A URI (S3, GCS, …; what a multi-node cluster uses): each rank writes its files
into a node-local scratch folder and uploads them itself; once all ranks agree, rank 0 uploads ``driver_state.json``,
the marker that makes the checkpoint count. Either way a crash never leaves a half checkpoint under ``PATH``. A
load downloads the checkpoint into node-local scratch on every rank first.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from rayuid.records import checkpoint as ckpt
from rayuid.records import storage
from rayuid.records.atomic import commit_folder


class FsdpLearner(Protocol):
    """What a checkpoint reads from and restores into: ``rayuid.system.learner.FsdpLearner`` (named, not imported,
    so the learner and its checkpoint do not import each other)."""

    cfg: Any
    rank: int
    world_size: int
    step: int
    is_lora: bool
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    teacher: Any
    tokenizer: Any

    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]: ...

META_FILE = "learner.json"
EXTRA_FILE = ckpt.DRIVER_STATE


def _options(learner: FsdpLearner) -> StateDictOptions:
    """LoRA: only the adapter is resumable state (the frozen base is rebuilt from model.name)."""
    return StateDictOptions(ignore_frozen_params=learner.is_lora, strict=not learner.is_lora)


def _resumable(learner: FsdpLearner, with_optimizer: bool) -> dict:
    """Sharded (DTensor) state to save, or the in-place template DCP loads into."""
    options = _options(learner)
    if with_optimizer:
        model_sd, optim_sd = get_state_dict(learner.model, learner.optimizer, options=options)
        state: dict = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(learner.model, options=options)}
    if learner.teacher.shadow:
        state["teacher"] = learner.teacher.shadow
    return state


def _all_ok(ok: bool, device: torch.device) -> bool:
    """Every rank learns whether all ranks succeeded, so a failure on one never leaves the others waiting."""
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(learner: FsdpLearner, path: str, extra: dict) -> str:
    """Collective: DCP shards + RNG per rank, then rank 0 writes the HF folder and metadata, and commits."""
    remote = storage.is_remote(path)
    with storage.scratch("ckpt") if remote else contextlib.nullcontext(_local_tmp(learner, Path(path))) as tmp:
        if remote and learner.rank == 0:
            storage.delete(path)  # a half upload of this step from a crashed attempt
        dist.barrier()
        _write(learner, tmp, extra)
        if remote:
            _upload(learner, tmp, path)
        elif learner.rank == 0:
            commit_folder(tmp, Path(path))
    dist.barrier()
    return path


def _upload(learner: FsdpLearner, tmp: Path, path: str) -> None:
    """Every rank uploads its own files; once all succeeded rank 0 uploads the marker."""
    error: BaseException | None = None
    try:
        storage.put_folder(tmp, path, skip=(EXTRA_FILE,))
    except Exception as err:  # noqa: BLE001 - re-raised below after telling the other ranks
        error = err
    if not _all_ok(error is None, learner.device):
        raise error or RuntimeError(f"another learner rank failed to upload its part of {path}; see its log")
    if learner.rank == 0:
        storage.put_file(tmp / EXTRA_FILE, storage.join(path, EXTRA_FILE))


def _local_tmp(learner: FsdpLearner, path: Path) -> Path:
    """The shared sibling temp folder every rank writes into (rank 0 creates it)."""
    tmp = path.parent / f".{path.name}.tmp"
    if learner.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def _write(learner: FsdpLearner, tmp: Path, extra: dict) -> None:
    """Every rank's shard and RNG state; rank 0's HF export and metadata. Raises on every rank if any failed."""
    # An optimizer that never stepped has no state; get_state_dict would create it with a fake step (step=1).
    with_optimizer = bool(learner.optimizer.state)
    dcp.save(_resumable(learner, with_optimizer), checkpoint_id=str(tmp / "dcp"))
    torch.save(ckpt.rng_state(), tmp / f"rng-{learner.rank}.pt")
    full = learner.full_state_dict(trainable_only=learner.is_lora)
    error: BaseException | None = None
    if learner.rank == 0:
        try:
            _write_rank0(learner, tmp, full, extra, with_optimizer)
        except Exception as err:  # noqa: BLE001 - re-raised below after telling the other ranks
            error = err
    if not _all_ok(error is None, learner.device):
        if error is not None:
            raise error
        raise RuntimeError("rank 0 failed to write the checkpoint; its error is in the rank-0 learner's log")


def _write_rank0(learner: FsdpLearner, tmp: Path, full: dict, extra: dict, with_optimizer: bool) -> None:
    """The HF export (``full`` holds rank 0's gathered weights) and the small replicated files."""
    hf = tmp / "hf"
    learner.model.save_pretrained(hf, state_dict=full)  # PeftModel: filters to the adapter, names as PEFT saves
    learner.tokenizer.save_pretrained(hf)
    torch.save(learner.scheduler.state_dict(), tmp / "scheduler.pt")
    meta = dict(step=learner.step, world_size=learner.world_size, lora=learner.is_lora,
                teacher=learner.cfg.teacher.weights, optimizer=with_optimizer)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / EXTRA_FILE).write_text(json.dumps(extra, indent=2))


def load(learner: FsdpLearner, path: str) -> dict:
    """Collective: restore model, optimizer, teacher, schedule, RNG and step; returns the driver's ``extra``."""
    others = tuple(n for n in storage.listdir(path) if n.startswith("rng-") and n != f"rng-{learner.rank}.pt")
    with storage.local_copy(path, "load", skip=(*others, "hf")) as local:  # a URI: downloaded, less what it needs not
        return _load(learner, local)


def _load(learner: FsdpLearner, path: Path) -> dict:
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"{path} is not a learner checkpoint (no {META_FILE}); pass a folder written by "
                                "FsdpLearner.save_checkpoint")
    meta = json.loads((path / META_FILE).read_text())
    mine = dict(lora=learner.is_lora, teacher=learner.cfg.teacher.weights)
    theirs = {k: meta[k] for k in mine}
    if mine != theirs:
        raise ValueError(f"checkpoint {path} was written with {theirs} but this learner has {mine}; resume with "
                         "the same model.lora and teacher.weights settings, or start a new run_dir")
    state = _resumable(learner, meta["optimizer"])
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    if "optim" in state:
        set_state_dict(learner.model, learner.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_options(learner))
    else:
        set_model_state_dict(learner.model, state["model"], options=_options(learner))
    learner.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{learner.rank}.pt"
    ckpt.set_rng_state(torch.load(rng if rng.exists() else path / "rng-0.pt", weights_only=False))
    learner.step = int(meta["step"])
    return json.loads((path / EXTRA_FILE).read_text())

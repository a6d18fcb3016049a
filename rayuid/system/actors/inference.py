"""Inference roles, each owning one vLLM engine (``rayuid.system.engine.VllmEngine``).

RolloutWorker samples replies; ScoringWorker scores given replies under student and hindsight contexts in one
prefill. SharedEngineWorker plays both roles on one engine, for machines too small for two (``teacher_workers: 0``).
A restarted actor comes back at policy version 0; the driver asks the WeightSyncActor to bring it up to date.
"""

from __future__ import annotations

import logging
import os

from rayuid import logs, precision
from rayuid.config import EngineSettings, SamplingSettings
from rayuid.sdpo.weights import WeightsBlob
from rayuid.system.engine import Generation, VllmEngine

log = logging.getLogger(__name__)


def start_engine(model: str, settings: dict, enable_lora: bool, seed: int, threads: int | None,
                 transfer: str | None = None) -> VllmEngine:
    """A VllmEngine on this node; ``transfer="collective"``: joinable by the learner's weight-transfer group, over
    NCCL where this node has a GPU, gloo otherwise (``rayuid.system.transport``)."""
    import torch

    from rayuid.sdpo.models import resolve_model

    logs.configure()
    if threads:
        torch.set_num_threads(threads)
    backend = None
    if transfer in ("collective", "collective-shared-gpu"):  # shared: the learner computes on this engine's GPU
        from rayuid.system import transport

        backend = transport.engine_backend("cuda" if torch.cuda.is_available() else "cpu",
                                           shared_gpu=transfer == "collective-shared-gpu")
    engine = VllmEngine(resolve_model(model), EngineSettings.model_validate(settings), enable_lora, seed, backend)
    log.info("vLLM engine for %s on %s: dtype %s, %d threads", model, precision.describe(), engine.dtype,
             torch.get_num_threads())
    return engine


class RolloutWorker:
    def __init__(self, model: str, settings: dict, enable_lora: bool = False, seed: int = 0, threads: int | None = None,
                 transfer: str | None = None):
        self.engine = start_engine(model, settings, enable_lora, seed, threads, transfer)

    def generate(self, prompts: list[list[int]], sampling: dict, seed: int | None = None,
                 users: list[str | None] | None = None, unknown_user: str = "base") -> list[list[Generation]]:
        return self.engine.generate(prompts, SamplingSettings.model_validate(sampling), seed, users, unknown_user)

    def load_weights(self, blob: WeightsBlob) -> tuple[int, str, float]:
        return self.engine.load_weights(blob)

    def load_adapter(self, user: str, blob: WeightsBlob) -> tuple[int, str]:
        return self.engine.load_adapter(user, blob)

    def version(self) -> int:
        return self.engine.version

    def served(self) -> tuple[int, str, float]:
        """(version, checksum) of what this engine serves now (after a collective publish: what it received)."""
        return self.engine.version, self.engine.checksum, 0.0

    def transfer_init(self, init_info: dict) -> None:
        self.engine.transfer_init(init_info)

    def transfer_start(self) -> None:
        self.engine.transfer_start()

    def transfer_update(self, update_info: dict) -> None:
        self.engine.transfer_update(update_info)

    def transfer_finish(self, version: int) -> tuple[int, str, float]:
        return self.engine.transfer_finish(version)

    def transfer_close(self) -> None:
        self.engine.transfer_close()

    def precision(self) -> dict:
        """The dtype this engine decided on (``auto`` is decided on its own node), and the hardware."""
        return {"dtype": self.engine.dtype, **precision.describe()}

    def pid(self) -> int:
        return os.getpid()


class ScoringWorker:
    """The teacher-scoring engine: log-probs of given replies under x and under x⊕o (the live policy in hindsight).
    Not to be confused with ``rayuid.sdpo.teacher_weights`` (which weights a learner-side teacher uses)."""

    def __init__(self, model: str, settings: dict, enable_lora: bool = False, seed: int = 0, threads: int | None = None,
                 transfer: str | None = None):
        self.engine = start_engine(model, settings, enable_lora, seed, threads, transfer)

    def score(self, student: list[list[int]], teacher: list[list[int]], responses: list[list[int]]) -> dict:
        """Both views in one batched prefill; returns per-token log-probs and the version that scored them."""
        lps = self.engine.score(student + teacher, responses + responses)
        return {"student_lp": lps[: len(student)], "teacher_lp": lps[len(student):], "version": self.engine.version}



class SharedEngineWorker:
    """Rollout and teacher roles on one engine (config ``ray.teacher_workers: 0``)."""

    def __init__(self, model: str, settings: dict, enable_lora: bool = False, seed: int = 0, threads: int | None = None,
                 transfer: str | None = None):
        self.engine = start_engine(model, settings, enable_lora, seed, threads, transfer)

    generate = RolloutWorker.generate
    score = ScoringWorker.score


# What every engine actor answers besides its role's own calls: weights in (both transports), version, precision.
ENGINE_CALLS = ("load_weights", "load_adapter", "version", "served", "transfer_init", "transfer_start",
                "transfer_update", "transfer_finish", "transfer_close", "precision", "pid")
for _cls in (ScoringWorker, SharedEngineWorker):
    for _name in ENGINE_CALLS:
        setattr(_cls, _name, getattr(RolloutWorker, _name))

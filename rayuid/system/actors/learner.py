"""A learner rank as a Ray actor: a thin forwarder to ``rayuid.system.learner.FsdpLearner``.

A plain class on purpose: the actor decorator is applied in one place (``rayuid.system.actors.spawn``), so this file
stays importable and testable without a Ray cluster. Every method except ``node_ip``/``free_port``/``ready`` is
collective: the driver calls it on all ranks of the group at once.
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch

from rayuid import logs, precision
from rayuid.config import TrainConfig
from rayuid.data.templates import ScoringPair
from rayuid.system import learner as sharded

log = logging.getLogger(__name__)


class LearnerWorker:
    """One FSDP rank. Build all ranks, ask rank 0 for ``node_ip()`` and ``free_port()``, then ``setup`` all."""

    def __init__(self, cfg_json: dict, rank: int, world_size: int, total_steps: int):
        logs.configure()
        self.cfg = precision.decide_model(TrainConfig.model_validate(cfg_json))  # `auto` decided on this node
        threads = self.cfg.threads or (self.cfg.ray.learner.num_threads() if self.cfg.ray else None)
        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world_size, self.total_steps = rank, world_size, total_steps
        self._learner: sharded.FsdpLearner | None = None
        log.info("learner%d: %s, %d threads", rank, precision.model_report(self.cfg), torch.get_num_threads())

    def precision(self) -> dict:
        """What this rank decided ``auto`` to be, and on what hardware."""
        return precision.model_report(self.cfg)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return sharded.free_port()

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the process group, then build and shard the model (both collective across the group)."""
        settings = self.cfg.ray
        backend = settings.backend if settings else "auto"
        timeout = settings.sync_timeout_s if settings else 300.0
        used = sharded.init_distributed(self.rank, self.world_size, master_addr, master_port, backend, timeout)
        self._learner = sharded.FsdpLearner(self.cfg, self.rank, self.world_size, self.total_steps)
        return {"rank": self.rank, "world_size": self.world_size, "backend": used}

    @property
    def learner(self) -> sharded.FsdpLearner:
        if self._learner is None:
            raise RuntimeError("LearnerWorker.setup(master_addr, master_port) must run on every rank first")
        return self._learner

    def train_step(self, pairs: list[ScoringPair], teacher_lp: list[list[float]] | None,
                   global_batch_size: int) -> dict:
        return self.learner.train_step(pairs, teacher_lp, global_batch_size)

    def export_weights(self, version: int, serve_dtype: str | None = None) -> dict:
        """On rank 0 ``{ref, checksum, bytes, export_s, put_s}`` (``{}`` elsewhere): a ref inside a dict is not
        resolved by Ray, so the blob is put into the object store once and engines fetch it from there."""
        t0 = time.perf_counter()
        blob = self.learner.export_weights(version, serve_dtype)
        if blob is None:
            return {}
        t1 = time.perf_counter()
        ref = ray.put(blob)  # copies the (reused) pack buffer into the object store
        return {"ref": ref, "checksum": blob.checksum, "bytes": blob.num_bytes, "export_s": t1 - t0,
                "put_s": time.perf_counter() - t1}

    def open_transport(self, engines: dict, address: str, port: int, bucket_bytes: int, timeout_s: float,
                       shared_gpu: bool = False) -> None:
        self.learner.open_transport(engines, address, port, bucket_bytes, timeout_s, shared_gpu)

    def send_weights(self, version: int, serve_dtype: str | None = None) -> dict:
        """A collective publish (all ranks); rank 0 returns ``{checksum, bytes, export_s, put_s, send_s}``."""
        return self.learner.send_weights(version, serve_dtype)

    def last_sent(self) -> list:
        """``[ref, checksum, bytes, version]`` of the version last sent (or being sent) collectively, put in the
        object store: what a restarted engine, or every engine after a failed transfer, loads instead."""
        blob = self.learner.last_sent
        if blob is None:
            return [None, "", 0, -1]
        return [ray.put(blob), blob.checksum, blob.num_bytes, blob.version]

    def close_transport(self) -> None:
        self.learner.close_transport()

    def response_logprobs(self, pairs: list[ScoringPair]) -> list[list[float]]:
        return self.learner.response_logprobs(pairs)

    def save_checkpoint(self, path: str, extra: dict) -> str:
        return self.learner.save_checkpoint(path, extra)

    def load_checkpoint(self, path: str) -> dict:
        return self.learner.load_checkpoint(path)

    def shutdown(self) -> None:
        """Leave the process group (before the actor is killed or the group is rebuilt)."""
        sharded.destroy()

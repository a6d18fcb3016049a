"""A per-user adapter learner as a Ray actor: a thin forwarder to ``rayuid.personal.adapters.UserAdapters``.

Each actor owns a disjoint set of users (the driver assigns them) and trains their LoRA adapters one user at a time;
users are independent, so the actors never talk to each other (no process group): more actors = more users trained
in parallel. A plain class: the actor decorator is applied in ``rayuid.system.actors.spawn``.
"""

from __future__ import annotations

import logging
import os

import ray
import torch

from rayuid import logs, precision
from rayuid.config import TrainConfig
from rayuid.data.templates import ScoringPair
from rayuid.personal.adapters import AdapterStore, UserAdapters

log = logging.getLogger(__name__)


class AdapterLearnerWorker:
    def __init__(self, cfg_json: dict, total_steps: int):
        logs.configure()
        self.cfg = precision.decide_model(TrainConfig.model_validate(cfg_json))  # `auto` decided on this node
        threads = self.cfg.threads or self.cfg.ray.learner.num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.adapters = UserAdapters(self.cfg, total_steps)
        log.info("adapter learner: %s, %d threads", precision.model_report(self.cfg), torch.get_num_threads())

    def precision(self) -> dict:
        """What this learner decided ``auto`` to be, and on what hardware."""
        return precision.model_report(self.cfg)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def train_users(self, batches: dict[str, list[ScoringPair]]) -> dict[str, dict]:
        """One optimizer step per user, each on that user's interactions only."""
        return {user: self.adapters.train_step(user, pairs) for user, pairs in batches.items()}

    def export_adapter(self, user: str) -> list:
        """``[ObjectRef, checksum, bytes, version]``: the list keeps Ray from resolving the ref on the way out."""
        self.adapters.ensure(user)
        blob = self.adapters.export(user)
        return [ray.put(blob), blob.checksum, blob.num_bytes, blob.version]

    def response_logprobs(self, user: str | None, pairs: list[ScoringPair]) -> list[list[float]]:
        return self.adapters.response_logprobs(user, pairs)

    def save(self, root: str, users: list[str]) -> dict[str, int]:
        """Write each user's current version under ``root/<user>/v<version>``; returns {user: version}."""
        store = AdapterStore(root)
        for user in users:
            self.adapters.ensure(user)
            self.adapters.save(store, user)
        return {user: self.adapters.versions[user] for user in users}

    def load(self, root: str, versions: dict[str, int]) -> dict[str, int]:
        """Restore the given version of each user (version 0 = a fresh adapter)."""
        store = AdapterStore(root)
        for user, version in versions.items():
            if version > 0:
                self.adapters.load(user, store.path(user, version))
            else:
                self.adapters.ensure(user)
        return {user: self.adapters.versions[user] for user in versions}

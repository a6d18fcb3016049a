"""What a run trains, as a strategy of the one driver loop (``rayuid.system.driver``).

A ``Policy`` holds the difference between a single-policy run and a per-user run: who owns which weights, what a
publish sends, how a checkpoint names versions, how the run is evaluated. The loop calls the same methods, in the
same order, for both; this module has the single-policy one (``SharedPolicy``), ``rayuid.system.per_user`` the
per-user one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol

from rayuid.config import TrainConfig
from rayuid.data.prompts import Prompt, prompts_for_step
from rayuid.data.templates import ScoringPair
from rayuid.records import checkpoint as ckpt
from rayuid.records.ledger import Ledger
from rayuid.system import phases
from rayuid.system.actors import spawn
from rayuid.system.calls import Calls
from rayuid.system.evaluation import HeldoutEval
from rayuid.system.learner_checkpoint import EXTRA_FILE
from rayuid.system.source import RunSource

log = logging.getLogger(__name__)
DRIVER_STATE = EXTRA_FILE  # the driver's state inside a checkpoint: its presence marks the checkpoint complete


class Policy(Protocol):
    """The per-run strategy the driver loop calls; every method returns what it produced."""

    label: str
    """The progress bar's name for the run."""

    def draw(self, step: int) -> tuple[list[Prompt], list[str] | None]:
        """The prompts of ``step`` and, per prompt, the user whose adapter answers it (None: one policy)."""

    def simulate(self, calls: Calls, samples: list[phases.Sample], step: int) -> tuple[list[str], dict]:
        """The follow-up to every sample, and what to record about who wrote them (e.g. each user's persona)."""

    def learn(self, calls: Calls, samples: list, pairs: list[ScoringPair], teacher_lp: list | None) -> dict:
        """One optimizer step on ``pairs`` (``samples`` say whose they are); returns the step's stats."""

    def learner_versions(self, calls: Calls, users: list[str | None]) -> list[int]:
        """Per interaction (``users[i]``: whose it is), the version its learner holds now: what a teacher scored in
        the learner scores with."""

    def publish(self, calls: Calls) -> dict:
        """Send the new weights to every engine; ``{"version", "bytes", ...}`` once all of them serve them."""

    def record(self, samples: list, stats: dict, published: dict, extra: dict) -> dict:
        """The policy's part of the step's ``metrics.jsonl`` record."""

    def evaluate(self, calls: Calls, tokenizer, done: int, version: int, at_start: bool = False) -> list[dict]:
        """Measure the served policy after ``done`` steps; returns the new points (none when the run has no
        evaluation). ``at_start``: the point before the loop's first step (the base model, or the resumed policy)."""

    def save(self, calls: Calls, step: int, version: int, ledger: Ledger) -> str:
        """A checkpoint after ``step`` steps (its location), complete once its driver state is written."""

    def restore(self, calls: Calls, republish: bool) -> tuple[int, Ledger]:
        """Resume from the newest checkpoint (or start over): (steps done, ledger), engines serving its weights."""

    def restart_learners(self, calls: Calls) -> Calls:
        """Replace the learners after one died; returns the calls that reach the new ones."""

    def finish(self, calls: Calls, tokenizer, run_dir: Path) -> dict:
        """The policy's part of ``summary.json`` (evaluation results, where the weights are)."""


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint (its driver state is written last, inside the atomic rename)."""
    return ckpt.latest_checkpoint(run_dir, marker=DRIVER_STATE)


class SharedPolicy:
    """One policy for everyone: full weights (or one LoRA adapter) trained by the FSDP learner group, published
    as one flat buffer to every engine, checkpointed by the learners (DCP) with the driver state inside."""

    def __init__(self, cfg: TrainConfig, source: RunSource):
        self.cfg, self.source = cfg, source
        self.label = f"sdpo {source.mode}"
        online = cfg.online
        self.evaluator = HeldoutEval(cfg, source.heldout, source.options) if online and online.eval_every else None

    def draw(self, step: int) -> tuple[list[Prompt], None]:
        idx = prompts_for_step(len(self.source.prompts), self.cfg.online.prompts_per_step, step, self.cfg.seed)
        return [self.source.prompts[i] for i in idx], None

    def simulate(self, calls: Calls, samples: list, step: int) -> tuple[list[str], dict]:
        return phases.simulate(calls, samples), {}

    def learn(self, calls: Calls, samples: list, pairs: list[ScoringPair], teacher_lp: list | None) -> dict:
        return phases.learn(calls, pairs, teacher_lp)

    def learner_versions(self, calls: Calls, users: list[str | None]) -> list[int]:
        return [calls.sync("current")["version"]] * len(users)

    def publish(self, calls: Calls) -> dict:
        return calls.sync("publish")

    def record(self, samples: list, stats: dict, published: dict, extra: dict) -> dict:
        return {**stats, "version": published["version"]}

    def evaluate(self, calls: Calls, tokenizer, done: int, version: int, at_start: bool = False) -> list[dict]:
        if self.evaluator is None:
            return []
        point = self.evaluator(calls, tokenizer, done * self.cfg.online.prompts_per_step, version)
        log.info("held-out eval after %d interactions: %s", point["interactions"], point)
        return [point]

    def save(self, calls: Calls, step: int, version: int, ledger: Ledger) -> str:
        """All learner ranks write their shards; the driver state (step, version, ledger) rides along."""
        path = ckpt.step_dir(self.cfg.run_dir, step)
        extra = {"step": step, "version": version, "ledger": ledger.to_json()}
        calls.learners("save_checkpoint", [(path, extra)] * len(calls.system.learners))
        ckpt.prune_checkpoints(self.cfg.run_dir, self.cfg.checkpoint.keep_last, marker=DRIVER_STATE)
        return path

    def restore(self, calls: Calls, republish: bool) -> tuple[int, Ledger]:
        """Learners load the newest checkpoint, engines get its weights under its version number. Without one a
        rebuilt group starts over and republishes its initial weights."""
        path = latest_checkpoint(self.cfg.run_dir) if self.cfg.checkpoint.resume else None
        if path is None:
            if republish:
                calls.sync("resume_at", -1)
                calls.sync("publish")
            return 0, Ledger()
        extra = calls.learners("load_checkpoint", [(path,)] * len(calls.system.learners))[0]
        calls.sync("resume_at", extra["version"] - 1)  # republish the checkpoint's weights as its version
        calls.sync("publish")
        log.info("resumed from %s at step %d", path, extra["step"])
        return int(extra["step"]), Ledger.from_json(extra["ledger"])

    def restart_learners(self, calls: Calls) -> Calls:
        log.warning("a learner died; rebuilding the group from the last checkpoint")
        return _with_new_learners(self.cfg, calls, self.source.total_steps)

    def finish(self, calls: Calls, tokenizer, run_dir: Path) -> dict:
        if self.evaluator is None or not self.evaluator.points:
            return {}
        return {"eval_table": self.evaluator.finish(run_dir), "eval_curve": str(run_dir / "eval_curve.png")}


def _with_new_learners(cfg: TrainConfig, calls: Calls, total_steps: int) -> Calls:
    """Kill what is left of the learners, start fresh ones in their bundles, point the WeightSyncActor at them."""
    learners = spawn.restart_learners(cfg, calls.system, total_steps)
    system = dataclasses.replace(calls.system, learners=learners)
    calls = Calls(system, calls.timeout_s, calls.retries)
    calls.sync("set_learners", learners)
    return calls

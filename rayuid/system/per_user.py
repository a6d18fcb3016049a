"""Per-user personalization (``online.users`` set) as a strategy of the one driver loop.

    per step: each user's prompts → generate (multi-LoRA: each reply by its user's newest adapter)
              → that user's simulator (its persona at this step) → learn (one optimizer step per user, teacher =
              the same adapter with the follow-up in context) → publish each user's new adapter → log

Adapters are checkpointed per user and version under ``RUN_DIR/adapters/<user>/v<N>`` (PEFT folders); the
checkpoint ``RUN_DIR/checkpoints/step-N/driver_state.json`` names the version of every user, so a resumed run
(or one whose adapter learner died) restores all users' adapters, optimizers and the evaluation so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rayuid.config import TrainConfig
from rayuid.data.prompts import Prompt, prompts_for_step
from rayuid.data.templates import ScoringPair
from rayuid.personal.adapters import AdapterStore
from rayuid.personal.report import results_table
from rayuid.personal.schedule import persona_at
from rayuid.records import checkpoint as ckpt
from rayuid.records import storage
from rayuid.records.ledger import Ledger
from rayuid.seeds import user_seed
from rayuid.system.calls import Calls
from rayuid.system.personal_eval import PersonalEval
from rayuid.system.policy import DRIVER_STATE, _with_new_learners
from rayuid.system.source import RunSource

log = logging.getLogger(__name__)


class PerUserPolicy:
    """One LoRA adapter per user, each trained by the adapter learner that owns the user, served side by side by
    every engine (multi-LoRA); a publish sends each user's new adapter, a checkpoint names every user's version."""

    label = "sdpo per-user"

    def __init__(self, cfg: TrainConfig, source: RunSource):
        self.cfg, self.source = cfg, source
        self.users = list(cfg.online.users)
        self.owners = {u.id: i % cfg.ray.learners for i, u in enumerate(self.users)}  # user → adapter learner
        self.versions: dict[str, int] = {}                                           # user → version it serves
        self.evaluator = PersonalEval(cfg, source.heldout, source.options)
        self.store = AdapterStore(storage.join(cfg.run_dir, "adapters"))

    def draw(self, step: int) -> tuple[list[Prompt], list[str]]:
        """Each user's prompts of ``step`` (a seeded draw per user) and the user id of each prompt."""
        prompts, users = [], []
        for k, user in enumerate(self.users):
            idx = prompts_for_step(len(self.source.prompts), self.cfg.online.prompts_per_step, step,
                                   user_seed(self.cfg.seed, k))
            prompts += [self.source.prompts[i] for i in idx]
            users += [user.id] * len(idx)
        return prompts, users

    def simulate(self, calls: Calls, samples: list, step: int) -> tuple[list[str], dict]:
        """Each user's follow-ups, written by the persona that user plays at ``step`` (all users at once)."""
        active = {u.id: persona_at(u, step, self.cfg.online.switch_every) for u in self.users}
        mine = {u.id: [i for i, s in enumerate(samples) if s.user == u.id] for u in self.users}
        asks = [(active[u.id], u.persona_params(active[u.id]), [samples[i].prompt.messages[-1]["content"]
                                                                 for i in mine[u.id]],
                 [samples[i].generation.text for i in mine[u.id]]) for u in self.users]
        followups = [""] * len(samples)
        for user, answers in zip(self.users, calls.user("respond_as", asks)):
            for i, followup in zip(mine[user.id], answers, strict=True):
                followups[i] = followup
        return followups, {"personas": active}

    def learn(self, calls: Calls, samples: list, pairs: list[ScoringPair], teacher_lp: list | None) -> dict:
        """One optimizer step per user on that user's interactions, in the learner that owns the user."""
        batches: list[dict] = [{} for _ in calls.system.learners]
        for s, pair in zip(samples, pairs, strict=True):
            batches[self.owners[s.user]].setdefault(s.user, []).append(pair)
        stats = {}
        for part in calls.learners("train_users", [(b,) for b in batches]):
            stats.update(part)
        return {"loss": sum(st["loss"] for st in stats.values()) / len(stats), "per_user": stats}

    def learner_versions(self, calls: Calls, users: list[str | None]) -> list[int]:
        return [self.versions.get(u, 0) for u in users]

    def publish(self, calls: Calls) -> dict:
        published = calls.sync("publish_adapters", self.owners)
        self.versions.update(published["users"])
        return {**published, "version": max(self.versions.values())}

    def record(self, samples: list, stats: dict, published: dict, extra: dict) -> dict:
        words = {u: [len(s.generation.text.split()) for s in samples if s.user == u] for u in self.owners}
        return {"loss": stats["loss"], "version": published["version"],
                "users": {u: {"persona": extra["personas"][u], "loss": st["loss"], "version": self.versions[u],
                              "mean_reply_words": sum(words[u]) / max(len(words[u]), 1)}
                          for u, st in stats["per_user"].items()}}

    def evaluate(self, calls: Calls, tokenizer, done: int, version: int, at_start: bool = False) -> list[dict]:
        if at_start and done > 0 and self.evaluator.rows:
            return []  # a resumed run keeps the evaluation rows its checkpoint restored
        rows = self.evaluator(calls, tokenizer, done, self.versions)
        for row in rows:
            log.info("eval after step %d: %s", done, row)
        return rows

    def save(self, calls: Calls, step: int, version: int, ledger: Ledger) -> str:
        """Every learner writes its users' adapters; then the driver state that names their versions, atomically."""
        root = self.store.root
        for part in calls.learners("save", [(root, self._owned_by(k)) for k in range(len(calls.system.learners))]):
            self.versions.update(part)
        final = ckpt.step_dir(self.cfg.run_dir, step)
        storage.write_text(storage.join(final, DRIVER_STATE), json.dumps(
            {"step": step, "versions": self.versions, "ledger": ledger.to_json(), "eval": self.evaluator.state()}))
        ckpt.prune_checkpoints(self.cfg.run_dir, self.cfg.checkpoint.keep_last, marker=DRIVER_STATE)
        keep = [json.loads(storage.read_text(storage.join(p, DRIVER_STATE)))["versions"]
                for p in ckpt.list_checkpoints(self.cfg.run_dir, DRIVER_STATE)]
        for user in self.owners:
            self.store.prune(user, self.cfg.checkpoint.keep_last, {v.get(user, 0) for v in keep})
        return final

    def restore(self, calls: Calls, republish: bool) -> tuple[int, Ledger]:
        """Every user's adapter version, the ledger and the evaluation so far from the newest checkpoint; without
        one every user starts at v0 (LoRA B = 0: the base model). Either way engines serve them before step 1."""
        path = ckpt.latest_checkpoint(self.cfg.run_dir, marker=DRIVER_STATE) if self.cfg.checkpoint.resume else None
        if path is None:
            self.versions = {}
            self.publish(calls)
            return 0, Ledger()
        state = json.loads(storage.read_text(storage.join(path, DRIVER_STATE)))
        root = self.store.root
        mine = [{u: v for u, v in state["versions"].items() if self.owners.get(u) == k}
                for k in range(len(calls.system.learners))]
        self.versions = {}
        for part in calls.learners("load", [(root, m) for m in mine]):
            self.versions.update(part)
        self.publish(calls)
        self.evaluator.restore(state["eval"])
        log.info("resumed from %s at step %d (versions %s)", path, state["step"], self.versions)
        return int(state["step"]), Ledger.from_json(state["ledger"])

    def restart_learners(self, calls: Calls) -> Calls:
        log.warning("an adapter learner died; restarting the learners from the last checkpoint")
        return _with_new_learners(self.cfg, calls, self.source.total_steps)

    def finish(self, calls: Calls, tokenizer, run_dir: Path) -> dict:
        if not self.evaluator.replies:  # e.g. a finished run started again: measure the final adapters
            self.evaluator(calls, tokenizer, self.source.total_steps, self.versions)
        results = self.evaluator.finish(run_dir)
        return {"results": {k: v for k, v in results.items() if k not in ("rows", "samples", "prompts")},
                "results_table": results_table(results),
                "adapters": {u: str(self.store.latest(u) or "") for u in self.owners}}

    def _owned_by(self, k: int) -> list[str]:
        return [u for u, i in self.owners.items() if i == k]

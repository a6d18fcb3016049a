"""The per-user personalization driver (``online.users`` set): one loop, every arrow an explicit call.

    per step: each user's prompts → generate (multi-LoRA: each reply by its user's newest adapter)
              → that user's simulator (its persona at this step) → learn (one optimizer step per user, teacher =
              the same adapter with the follow-up in context) → publish each user's new adapter → log

Adapters are checkpointed per user and version under ``RUN_DIR/adapters/<user>/v<N>`` (PEFT folders); the
checkpoint ``RUN_DIR/checkpoints/step-N/driver_state.json`` names the version of every user, so a resumed run
restores all users' adapters, optimizers and the evaluation so far.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm.auto import tqdm

from rayuid import checkpoint as ckpt
from rayuid import phases
from rayuid.actors import spawn
from rayuid.adapters import AdapterStore
from rayuid.config import TrainConfig
from rayuid.ledger import Ledger
from rayuid.personal_eval import PersonalEval, persona_at, results_table
from rayuid.prompts import prompts_for_step
from rayuid.run_state import RunSource, finish, launch
from rayuid.trainer import MetricsLog

log = logging.getLogger(__name__)
STATE = "driver_state.json"


@dataclass
class Run:
    cfg: TrainConfig
    system: spawn.System
    tokenizer: object
    source: RunSource
    evaluator: PersonalEval
    owners: dict[str, int]                      # user id → index of the adapter learner that trains it
    ledger: Ledger = field(default_factory=Ledger)
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def timeout(self) -> float:
        return self.cfg.ray.call_timeout_s


def run(cfg: TrainConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    tokenizer, source, system = launch(cfg)
    owners = {u.id: i % cfg.ray.learners for i, u in enumerate(cfg.online.users)}
    r = Run(cfg, system, tokenizer, source, PersonalEval(cfg, source.heldout, source.options), owners)
    try:
        start = restore(r)
        metrics = MetricsLog(run_dir / "metrics.jsonl", start)
        source.truncate_samples(start)
        loop(r, start, metrics)
        if not r.evaluator.replies:  # e.g. a finished run started again: measure the final adapters
            r.evaluator(r.system, r.tokenizer, source.total_steps, r.versions)
        summary = finish(cfg, metrics.records(), r.ledger, source, r.system.precision)
        results = r.evaluator.finish(run_dir)
        summary["results"] = {k: v for k, v in results.items() if k not in ("rows", "samples", "prompts")}
        summary["results_table"] = results_table(results)
        summary["adapters"] = {u: str(AdapterStore(run_dir / "adapters").latest(u) or "") for u in owners}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        system.shutdown()


def loop(r: Run, start: int, metrics: MetricsLog) -> None:
    o, total = r.cfg.online, r.source.total_steps
    if start == 0 or not r.evaluator.rows:
        r.evaluator(r.system, r.tokenizer, start, r.versions)                                # base point
    for step in tqdm(range(start, total), initial=start, total=total, desc="sdpo per-user", unit="step"):
        t0 = time.perf_counter()
        record = user_step(r, step)
        record["seconds"] = time.perf_counter() - t0
        metrics.write(record)
        done = step + 1
        if (o.eval_every and done % o.eval_every == 0) or done == total:
            for row in r.evaluator(r.system, r.tokenizer, done, r.versions):
                log.info("eval after step %d: %s", done, row)
        if (r.cfg.checkpoint.every_steps and done % r.cfg.checkpoint.every_steps == 0) or done == total:
            save(r, done)


def _step_prompts(r: Run, step: int) -> tuple[list, list[str]]:
    """Each user's prompts of ``step`` (a seeded draw per user) and the user id of each prompt."""
    prompts, users = [], []
    for k, user in enumerate(r.cfg.online.users):
        idx = prompts_for_step(len(r.source.prompts), r.cfg.online.prompts_per_step, step, r.cfg.seed + 7919 * k)
        prompts += [r.source.prompts[i] for i in idx]
        users += [user.id] * len(idx)
    return prompts, users


def simulate(r: Run, samples: list[phases.Sample], step: int) -> dict[str, str]:
    """Each user's follow-ups, written by the persona that user plays at ``step``."""
    active, mine, refs = {}, {}, []
    for user in r.cfg.online.users:  # all users' batches are submitted before any is awaited
        mine[user.id] = [s for s in samples if s.user == user.id]
        active[user.id] = persona_at(user, step, r.cfg.online.switch_every)
        refs.append(r.system.user.respond_as.remote(
            active[user.id], user.persona_params(active[user.id]),
            [s.prompt.messages[-1]["content"] for s in mine[user.id]], [s.generation.text for s in mine[user.id]]))
    for uid, followups in zip(mine, ray.get(refs, timeout=r.timeout)):
        for s, followup in zip(mine[uid], followups):
            s.followup = followup
    return active


def user_step(r: Run, step: int) -> dict:
    times, t = {}, time.perf_counter()
    prompts, users = _step_prompts(r, step)
    sampling = r.cfg.online.sampling.model_dump(mode="json")
    samples = phases.generate(r.system, r.tokenizer, prompts, step, sampling, r.source.options, r.cfg.seed,
                              r.timeout, r.cfg.ray.max_restarts, users, r.cfg.online.unknown_user)  # generate
    times["generate_s"], t = time.perf_counter() - t, time.perf_counter()
    active = simulate(r, samples, step)                                                            # simulate
    phases.online_pairs(r.tokenizer, samples, r.source.options)
    times["simulate_s"], t = time.perf_counter() - t, time.perf_counter()
    batches: list[dict] = [{} for _ in r.system.learners]
    for s in samples:
        batches[r.owners[s.user]].setdefault(s.user, []).append(s.pair)
    stats = {}
    for part in ray.get([l.train_users.remote(b) for l, b in zip(r.system.learners, batches)], timeout=r.timeout):
        stats.update(part)                                                                         # learn
    times["learn_s"], t = time.perf_counter() - t, time.perf_counter()
    published = ray.get(r.system.sync.publish_adapters.remote(r.owners), timeout=r.timeout)       # publish
    times["sync_s"] = time.perf_counter() - t
    r.versions.update(published["users"])
    r.ledger.record(step + 1, [s.id for s in samples])
    r.source.write_samples(step + 1, samples, [s.generation.version for s in samples])
    words = {u: [len(s.generation.text.split()) for s in samples if s.user == u] for u in r.owners}
    return {**times, "step": step + 1, "interactions": len(samples), "version": max(r.versions.values()),
            "loss": sum(st["loss"] for st in stats.values()) / len(stats), "publish_bytes": published["bytes"],
            "mean_reply_words": sum(map(sum, words.values())) / max(len(samples), 1),
            "users": {u: {"persona": active[u], "loss": st["loss"], "version": r.versions[u],
                          "mean_reply_words": sum(words[u]) / max(len(words[u]), 1)} for u, st in stats.items()}}


def save(r: Run, step: int) -> Path:
    """Every learner writes its users' adapters; then the driver state that names their versions, atomically."""
    root = Path(r.cfg.run_dir) / "adapters"
    mine = [[u for u, i in r.owners.items() if i == k] for k in range(len(r.system.learners))]
    for part in ray.get([l.save.remote(str(root.absolute()), users) for l, users in zip(r.system.learners, mine)],
                        timeout=r.timeout):
        r.versions.update(part)
    final = ckpt.step_dir(r.cfg.run_dir, step)
    with ckpt.atomic_folder(final) as tmp:
        (tmp / STATE).write_text(json.dumps({"step": step, "versions": r.versions, "ledger": r.ledger.to_json(),
                                             "eval": r.evaluator.state()}))
    ckpt.prune_checkpoints(r.cfg.run_dir, r.cfg.checkpoint.keep_last, marker=STATE)
    keep = [json.loads((p / STATE).read_text())["versions"] for p in ckpt.list_checkpoints(r.cfg.run_dir, STATE)]
    store = AdapterStore(root)
    for user in r.owners:
        store.prune(user, r.cfg.checkpoint.keep_last, {v.get(user, 0) for v in keep})
    return final


def restore(r: Run) -> int:
    """Resume from the newest checkpoint: every user's adapter version, the ledger and the evaluation so far."""
    path = ckpt.latest_checkpoint(r.cfg.run_dir, marker=STATE) if r.cfg.checkpoint.resume else None
    if path is None:  # every user starts at v0 (LoRA B = 0: the base model), served from the start
        r.versions.update(ray.get(r.system.sync.publish_adapters.remote(r.owners), timeout=r.timeout)["users"])
        return 0
    state = json.loads((path / STATE).read_text())
    root = str((Path(r.cfg.run_dir) / "adapters").absolute())
    mine = [{u: v for u, v in state["versions"].items() if r.owners.get(u) == k} for k in range(len(r.system.learners))]
    for part in ray.get([l.load.remote(root, m) for l, m in zip(r.system.learners, mine)], timeout=r.timeout):
        r.versions.update(part)
    ray.get(r.system.sync.publish_adapters.remote(r.owners), timeout=r.timeout)
    r.ledger = Ledger.from_json(state["ledger"])
    r.evaluator.restore(state["eval"])
    log.info("resumed from %s at step %d (versions %s)", path, state["step"], r.versions)
    return int(state["step"])

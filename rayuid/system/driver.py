"""The Ray driver: ONE loop for every kind of run, in which every arrow of the data flow is an explicit call.

    online  (paper Algorithm 1): prompts → generate → simulate user → score → learn → publish → log
    offline (logged chats):      interactions → score → learn → publish → log
    then, every few steps:       evaluate, checkpoint

What differs between a single-policy run and a per-user run (who owns which weights, what a publish sends, how a
checkpoint names versions) is a ``Policy`` (``rayuid.system.policy``): both get the same loop, the same learner-death
recovery, simulator retries and checkpoint/resume.

Strictly on-policy by default: step t+1 starts only after every engine serves the weights learned at step t. With
``online.max_staleness: 1`` the replies of step t+1 are generated while step t learns (one version behind), and
every sample records the version that generated it and the version that scored it.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm.auto import tqdm

from rayuid.config import TrainConfig, dump_config
from rayuid.records import storage
from rayuid.records.ledger import Ledger
from rayuid.records.metrics import MetricsLog
from rayuid.records.plots import plot_metrics
from rayuid.records.storage import RunDir
from rayuid.records.trackers import Trackers
from rayuid.sdpo.models import load_tokenizer, resolve_model
from rayuid.system import phases
from rayuid.system.actors import spawn
from rayuid.system.calls import LEARNER_LOST, Calls
from rayuid.system.per_user import PerUserPolicy
from rayuid.system.policy import Policy, SharedPolicy, latest_checkpoint
from rayuid.system.source import RunSource, build_source

log = logging.getLogger(__name__)
PHASES = ("generate_s", "simulate_s", "score_s", "learn_s", "sync_s")


def run(cfg: TrainConfig) -> dict:
    """Start (or join) Ray, start the actors, train, checkpoint, and return the summary (also ``summary.json``)."""
    spawn.connect(cfg.ray.address, cfg.ray.num_cpus)
    records = RunDir(cfg.run_dir)  # the driver's records: written here, uploaded to run_dir's storage by push()
    records.pull()
    spawn.check_shared_run_dir(records)
    local = records.local
    dump_config(cfg, local / "config.yaml")
    tokenizer = load_tokenizer(resolve_model(cfg.model.name))
    source = build_source(cfg, tokenizer, records)
    system = spawn.build_system(cfg, source.total_steps)
    policy: Policy = PerUserPolicy(cfg, source) if spawn.per_user(cfg) else SharedPolicy(cfg, source)
    calls, trackers = Calls(system, cfg.ray.call_timeout_s, cfg.ray.max_restarts), None
    try:
        name = cfg.run_name or storage.basename(records.location)
        trackers = Trackers(cfg.report_to, local, name, cfg.model_dump(mode="json"))
        calls, metrics, ledger = train_with_recovery(cfg, calls, policy, source, tokenizer, trackers)
        summary = {**finish(cfg, metrics.records(), ledger, source, system.precision),
                   "weight_transfer": system.transfer, "nodes": spawn.placement(calls.system),
                   **policy.finish(calls, tokenizer, local)}
        trackers.images({"metrics": summary["plot"], "eval_curve": summary.get("eval_curve"),
                         "results": local / "results.png"})
        summary = records.located(summary)  # paths in the working copy → where they are stored
        (local / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        try:
            if trackers is not None:
                trackers.close()
            records.push()
        finally:
            calls.system.shutdown()


def train_with_recovery(cfg: TrainConfig, calls: Calls, policy: Policy, source: RunSource, tokenizer,
                        trackers: Trackers | None = None) -> tuple[Calls, MetricsLog, Ledger]:
    """Train; if a learner dies, replace the learners and resume everything from the last checkpoint."""
    for attempt in range(cfg.ray.max_restarts + 1):
        start, ledger = policy.restore(calls, republish=attempt > 0)
        metrics = MetricsLog(source.run_dir / "metrics.jsonl", start, trackers)
        source.truncate_samples(start)
        try:
            loop(cfg, calls, policy, source, tokenizer, start, metrics, ledger)
            return calls, metrics, ledger
        except LEARNER_LOST as err:
            if attempt == cfg.ray.max_restarts:
                raise
            log.warning("%s during step; restarting the learners", type(err).__name__)
            calls = policy.restart_learners(calls)
    raise AssertionError("unreachable")


def loop(cfg: TrainConfig, calls: Calls, policy: Policy, source: RunSource, tokenizer, start: int,
         metrics: MetricsLog, ledger: Ledger) -> None:
    """Steps ``start`` … ``total_steps - 1``: one record per step, evaluation and checkpoints when due."""
    total = source.total_steps
    every = cfg.online.eval_every if cfg.online is not None else 0
    bar = tqdm(range(start, total), initial=start, total=total, desc=policy.label, unit="step")
    if cfg.online is not None:
        metrics.evaluated(start, policy.evaluate(calls, tokenizer, start, start, at_start=True))  # base/resumed
    pool, pending = ThreadPoolExecutor(1), None
    try:
        for step in bar:
            t0 = time.perf_counter()
            if source.mode == "online":
                record, pending = online_step(cfg, calls, policy, source, tokenizer, step, ledger, pending, pool)
            else:
                record = offline_step(cfg, calls, policy, source, step, ledger)
            record["seconds"] = time.perf_counter() - t0
            metrics.write(record)
            source.records.push()
            bar.set_postfix(loss=f"{record['loss']:.3f}", v=record["version"])
            done = step + 1
            if (every and done % every == 0) or (cfg.online is not None and done == total):
                metrics.evaluated(done, policy.evaluate(calls, tokenizer, done, record["version"]))
            if (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or done == total:
                policy.save(calls, done, record["version"], ledger)
    finally:
        pool.shutdown(wait=False)


def generate(cfg: TrainConfig, calls: Calls, policy: Policy, source: RunSource, tokenizer,
             step: int) -> list[phases.Sample]:
    """The replies of ``step``: the policy draws the prompts (and whose each is), the rollout engines answer."""
    prompts, users = policy.draw(step)
    sampling = phases.Sampling(cfg.online.sampling.model_dump(mode="json"), cfg.seed, cfg.online.unknown_user)
    return phases.generate(calls, tokenizer, prompts, step, sampling, source.options, users)


def online_step(cfg: TrainConfig, calls: Calls, policy: Policy, source: RunSource, tokenizer, step: int,
                ledger: Ledger, pending: Future | None, pool: ThreadPoolExecutor) -> tuple[dict, Future | None]:
    """One online step (paper Algorithm 1); returns its metrics record and, with ``max_staleness: 1``, the replies
    of the next step being generated meanwhile."""
    clock = Clock()
    samples = pending.result() if pending is not None else generate(cfg, calls, policy, source, tokenizer, step)
    clock.lap("generate_s")                                                                        # generate
    followups, about = policy.simulate(calls, samples, step)                                       # simulate
    pairs = phases.online_pairs(tokenizer, samples, followups, source.options)
    clock.lap("simulate_s")
    teacher_lp, versions = score(cfg, calls, policy, [s.user for s in samples], pairs)  # score
    clock.lap("score_s")
    ahead = cfg.online.max_staleness == 1 and step + 1 < source.total_steps
    pending = pool.submit(generate, cfg, calls, policy, source, tokenizer, step + 1) if ahead else None  # overlap
    stats = policy.learn(calls, samples, pairs, teacher_lp)                                        # learn
    clock.lap("learn_s")
    published = policy.publish(calls)                                                              # publish
    clock.lap("sync_s")
    ledger.record(step + 1, [s.id for s in samples])                                               # log
    source.write_samples(step + 1, samples, followups, versions)
    words = [len(s.generation.text.split()) for s in samples]
    return {**policy.record(samples, stats, published, about), **clock.times, "step": step + 1,  # the driver's keys
            "interactions": len(samples), "gen_versions": sorted({s.generation.version for s in samples}),  # win
            "score_versions": sorted(set(versions)), "mean_reply_words": sum(words) / max(len(words), 1),
            "publish_bytes": published["bytes"], "publish_via": published.get("via")}, pending


def offline_step(cfg: TrainConfig, calls: Calls, policy: Policy, source: RunSource, step: int,
                 ledger: Ledger) -> dict:
    """One offline step on the next batch of logged interactions; returns its metrics record."""
    clock = Clock()
    pairs, ids = source.offline_batch(step)
    teacher_lp, versions = score(cfg, calls, policy, [None] * len(pairs), pairs)        # score
    clock.lap("score_s")
    stats = policy.learn(calls, [], pairs, teacher_lp)                                             # learn
    clock.lap("learn_s")
    published = policy.publish(calls)                                                              # publish
    clock.lap("sync_s")
    ledger.record(step + 1, ids)                                                                   # log
    return {**policy.record([], stats, published, {}), **clock.times, "step": step + 1, "interactions": len(pairs),
            "score_versions": sorted(set(versions)), "publish_bytes": published["bytes"],
            "publish_via": published.get("via")}


def score(cfg: TrainConfig, calls: Calls, policy: Policy, users: list[str | None],
          pairs: list) -> tuple[list | None, list[int]]:
    """Teacher log-probs from the scoring engines (``ray.teacher_in: vllm``) and the version each was scored with;
    or None: the learner scores them, with the version it holds now."""
    if cfg.ray.teacher_in == "vllm":
        return phases.score(calls, pairs)
    return None, policy.learner_versions(calls, users)


class Clock:
    """Seconds per phase of one step: ``lap(name)`` records the time since the previous lap."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self._last = now - self._last, now


def finish(cfg: TrainConfig, records: list[dict], ledger: Ledger, source: RunSource, precision: dict) -> dict:
    """The summary every run has: counts, losses, seconds per phase, and each role's decided precision."""
    run_dir = source.run_dir
    counts = ledger.counts()
    (run_dir / "ledger.json").write_text(json.dumps(ledger.to_json()))
    return dict(
        run_dir=source.records.location, mode=source.mode, steps_done=len(records), total_steps=source.total_steps,
        interactions_trained=sum(counts.values()), interactions_trained_twice=sum(1 for n in counts.values() if n > 1),
        first_loss=records[0]["loss"] if records else None, final_loss=records[-1]["loss"] if records else None,
        final_version=records[-1]["version"] if records else 0,
        seconds_per_phase={p: sum(r.get(p, 0.0) for r in records) for p in PHASES},
        interactions_per_s=sum(r["interactions"] for r in records) / max(sum(r["seconds"] for r in records), 1e-9),
        checkpoint=latest_checkpoint(cfg.run_dir) or "", metrics=str(run_dir / "metrics.jsonl"),
        plot=str(plot_metrics(records, run_dir / "metrics.png", ("loss", "adv_mean", "mean_reply_words")))
        if records else None,
        precision=precision,
    )

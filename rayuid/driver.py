"""The Ray driver: one loop in which every arrow of the data flow is an explicit call.

    online  (paper Algorithm 1): prompts → generate → simulate user → score → learn → publish → log
    offline (logged chats):      interactions → score → learn → publish → log

Strictly on-policy by default: step t+1 starts only after every engine serves the weights learned at step t. With
``online.max_staleness >= 1`` the replies of step t+1 are generated while step t learns (one version behind), and
every sample records the version that generated it and the version that scored it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm.auto import tqdm

from rayuid import phases
from rayuid.actors import spawn
from rayuid.config import TrainConfig
from rayuid.evaluation import HeldoutEval
from rayuid.ledger import Ledger
from rayuid.prompts import prompts_for_step
from rayuid.run_state import RunSource, finish, latest_checkpoint, launch, save_checkpoint
from rayuid.trainer import MetricsLog

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: TrainConfig
    system: spawn.System
    tokenizer: object
    source: RunSource
    ledger: Ledger = field(default_factory=Ledger)
    evaluator: HeldoutEval | None = None
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    @property
    def timeout(self) -> float:
        return self.cfg.ray.call_timeout_s


def run(cfg: TrainConfig) -> dict:
    """Start (or join) Ray, start the actors, train, checkpoint, and return the summary."""
    run_dir = Path(cfg.run_dir)
    tokenizer, source, system = launch(cfg)
    r = Run(cfg, system, tokenizer, source)
    if cfg.online is not None and cfg.online.eval_every:
        r.evaluator = HeldoutEval(cfg, source.heldout, source.options)
    try:
        metrics = train_with_recovery(r)
        summary = finish(cfg, metrics.records(), r.ledger, source, r.system.precision)
        if r.evaluator is not None and r.evaluator.points:
            summary["eval_table"] = r.evaluator.finish(run_dir)
            summary["eval_curve"] = str(run_dir / "eval_curve.png")
        return summary
    finally:
        r.pool.shutdown(wait=False)
        system.shutdown()


def train_with_recovery(r: Run) -> MetricsLog:
    """Train; if a learner rank dies, rebuild the group and resume everything from the last checkpoint."""
    run_dir = Path(r.cfg.run_dir)
    for attempt in range(r.cfg.ray.max_restarts + 1):
        start = restore(r, republish=attempt > 0)
        metrics = MetricsLog(run_dir / "metrics.jsonl", start)
        r.source.truncate_samples(start)
        try:
            loop(r, start, metrics)
            return metrics
        except phases.ACTOR_DIED as err:
            if attempt == r.cfg.ray.max_restarts:
                raise
            log.warning("a learner died (%s); rebuilding the group from the last checkpoint", type(err).__name__)
            r.system.learners = spawn.restart_learners(r.cfg, r.system, r.source.total_steps)
            ray.get(r.system.sync.set_learners.remote(r.system.learners))
    raise AssertionError("unreachable")


def restore(r: Run, republish: bool = False) -> int:
    """Resume from the newest checkpoint: learners load it, engines get its weights (same version number), the
    ledger is restored. Without a checkpoint a rebuilt group starts over and republishes its initial weights."""
    path = latest_checkpoint(r.cfg.run_dir) if r.cfg.checkpoint.resume else None
    if path is None:
        r.ledger = Ledger()
        if republish:
            ray.get(r.system.sync.resume_at.remote(-1))
            ray.get(r.system.sync.publish.remote(), timeout=r.timeout)
        return 0
    extra = ray.get([l.load_checkpoint.remote(str(path.absolute())) for l in r.system.learners],
                    timeout=r.timeout)[0]
    r.ledger = Ledger.from_json(extra["ledger"])
    ray.get(r.system.sync.resume_at.remote(extra["version"] - 1))  # republish the checkpoint's weights as its version
    ray.get(r.system.sync.publish.remote(), timeout=r.timeout)
    log.info("resumed from %s at step %d", path, extra["step"])
    return int(extra["step"])


def loop(r: Run, start: int, metrics: MetricsLog) -> None:
    total = r.source.total_steps
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"sdpo {r.source.mode}", unit="step")
    pending = None
    if r.evaluator is not None:
        r.evaluator(r.system, r.tokenizer, start * r.cfg.online.prompts_per_step, start)   # base (or resumed) policy
    for step in bar:
        t0 = time.perf_counter()
        if r.source.mode == "online":
            record, pending = online_step(r, step, pending)
        else:
            record = offline_step(r, step)
        record["seconds"] = time.perf_counter() - t0
        metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", v=record["version"])
        done = step + 1
        if r.evaluator is not None and (done % r.cfg.online.eval_every == 0 or done == total):
            point = r.evaluator(r.system, r.tokenizer, done * r.cfg.online.prompts_per_step, record["version"])
            log.info("held-out eval after %d interactions: %s", point["interactions"], point)
        if (r.cfg.checkpoint.every_steps and done % r.cfg.checkpoint.every_steps == 0) or done == total:
            save_checkpoint(r.cfg, r.system, done, record["version"], r.ledger)


def _prompts(r: Run, step: int) -> list:
    idx = prompts_for_step(len(r.source.prompts), r.cfg.online.prompts_per_step, step, r.cfg.seed)
    return [r.source.prompts[i] for i in idx]


def _generate(r: Run, step: int) -> list[phases.Sample]:
    sampling = r.cfg.online.sampling.model_dump(mode="json")
    return phases.generate(r.system, r.tokenizer, _prompts(r, step), step, sampling, r.source.options, r.cfg.seed,
                           r.timeout, r.cfg.ray.max_restarts)


def online_step(r: Run, step: int, pending) -> tuple[dict, object]:
    times = {}
    t = time.perf_counter()
    samples = pending.result() if pending is not None else _generate(r, step)                  # generate
    times["generate_s"], t = time.perf_counter() - t, time.perf_counter()
    phases.simulate(r.system, samples, r.timeout, r.cfg.ray.max_restarts)                       # simulate
    phases.online_pairs(r.tokenizer, samples, r.source.options)
    times["simulate_s"], t = time.perf_counter() - t, time.perf_counter()
    pairs = [s.pair for s in samples]
    teacher_lp, versions = _score(r, pairs)                                                      # score
    times["score_s"], t = time.perf_counter() - t, time.perf_counter()
    ahead = r.cfg.online.max_staleness > 0 and step + 1 < r.source.total_steps
    pending = r.pool.submit(_generate, r, step + 1) if ahead else None                           # overlap
    stats = phases.learn(r.system, pairs, teacher_lp, r.timeout)                                 # learn
    times["learn_s"], t = time.perf_counter() - t, time.perf_counter()
    published = ray.get(r.system.sync.publish.remote(), timeout=r.timeout)                      # publish
    times["sync_s"] = time.perf_counter() - t
    r.ledger.record(step + 1, [s.id for s in samples])
    record = _record(step, samples, versions, stats, published, times)
    r.source.write_samples(step + 1, samples, versions)
    return record, pending


def offline_step(r: Run, step: int) -> dict:
    times = {}
    t = time.perf_counter()
    pairs, ids = r.source.offline_batch(step)
    teacher_lp, versions = _score(r, pairs)                                                      # score
    times["score_s"], t = time.perf_counter() - t, time.perf_counter()
    stats = phases.learn(r.system, pairs, teacher_lp, r.timeout)                                 # learn
    times["learn_s"], t = time.perf_counter() - t, time.perf_counter()
    published = ray.get(r.system.sync.publish.remote(), timeout=r.timeout)                      # publish
    times["sync_s"] = time.perf_counter() - t
    r.ledger.record(step + 1, ids)
    return {**stats, **times, "step": step + 1, "version": published["version"], "interactions": len(pairs),
            "score_versions": sorted(set(versions)), "publish_bytes": published["bytes"]}


def _score(r: Run, pairs: list) -> tuple[list | None, list[int]]:
    if r.cfg.ray.teacher_in == "vllm":
        return phases.score(r.system, pairs, r.timeout, r.cfg.ray.max_restarts)
    version = ray.get(r.system.sync.current.remote())["version"]
    return None, [version] * len(pairs)


def _record(step: int, samples: list, versions: list[int], stats: dict, published: dict, times: dict) -> dict:
    words = [len(s.generation.text.split()) for s in samples]
    return {**stats, **times, "step": step + 1, "version": published["version"], "interactions": len(samples),
            "gen_versions": sorted({s.generation.version for s in samples}), "score_versions": sorted(set(versions)),
            "mean_reply_words": sum(words) / max(len(words), 1), "publish_bytes": published["bytes"]}

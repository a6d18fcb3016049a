"""The offline SDPO trainer (single process): logged interactions → hindsight contexts → optimizer steps.

    rayuid train jobs/offline_smollm2_sample.yaml [key=value ...]

Data order is a pure function of (seed, epoch), so the data position is just the optimizer step; a run resumed from
step k sees exactly the batches an uninterrupted run would, and produces the same per-step losses.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rayuid import precision
from rayuid.config import TrainConfig, dump_config
from rayuid.data.pairs import example_order, load_pairs
from rayuid.records import checkpoint as ckpt
from rayuid.records import storage
from rayuid.records.storage import RunDir
from rayuid.records.metrics import MetricsLog
from rayuid.records.plots import plot_metrics
from rayuid.records.trackers import Trackers
from rayuid.sdpo.models import build_model, load_tokenizer, resolve_model
from rayuid.sdpo.optim import build_optimizer, optimizer_step
from rayuid.sdpo.step import train_batch
from rayuid.sdpo.teacher_weights import TeacherWeights

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run (or resume) the offline trainer; returns the summary also written to ``RUN_DIR/summary.json``.

    ``stop_after``: end the process's work after that many optimizer steps (simulates an interruption in tests).
    """
    records = RunDir(cfg.run_dir)  # written here, uploaded to run_dir's storage (a no-op for a local run_dir)
    records.pull()
    run_dir = records.local
    dump_config(cfg, run_dir / "config.yaml")
    cfg = precision.decide_model(cfg)  # `auto` decided for this process's device
    log.info("offline trainer: %s", precision.model_report(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    latest = ckpt.latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume else None
    resume_from = storage.fetch(latest, run_dir / "checkpoints" / "resume") if latest else None
    tokenizer = load_tokenizer(resolve_model(cfg.model.name))
    pairs, report = load_pairs(cfg, tokenizer)
    (run_dir / "extract_report.json").write_text(json.dumps(report, indent=2))
    batch_size = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps
    order = example_order(len(pairs), cfg.optim.epochs, cfg.seed)
    total_steps = min(math.ceil(len(order) / batch_size), cfg.optim.max_steps or 10**12)
    model = build_model(cfg, resume_from)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    teacher = TeacherWeights(model, cfg.teacher.weights, cfg.teacher.ema_rate)
    start = _restore(resume_from, optimizer, scheduler, teacher)
    name = cfg.run_name or storage.basename(records.location)
    trackers = Trackers(cfg.report_to, run_dir, name, cfg.model_dump(mode="json"))
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    try:
        metrics = MetricsLog(run_dir / "metrics.jsonl", start, trackers)
        loop = dict(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, teacher=teacher,
                    pairs=pairs, order=order, batch_size=batch_size, metrics=metrics)
        last = _run_steps(cfg, start, end, total_steps, **loop)
        summary = _finish(cfg, records, metrics, last, total_steps, len(pairs), report)
        trackers.images({"metrics": summary["plot"]})
        return records.located(summary)
    finally:
        trackers.close()
        records.push()


def _restore(resume_from: Path | None, optimizer, scheduler, teacher: TeacherWeights) -> int:
    if resume_from is None:
        return 0
    state = ckpt.load_trainer_state(resume_from)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    teacher.load_state_dict(state["teacher"])
    ckpt.set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", resume_from, state["step"])
    return int(state["step"])


def _run_steps(cfg: TrainConfig, start: int, end: int, total: int, *, model, tokenizer, optimizer, scheduler,
               teacher, pairs, order, batch_size, metrics) -> str | None:
    last_ckpt = None
    every = cfg.checkpoint.every_steps
    bar = tqdm(range(start, end), initial=start, total=total, desc="sdpo offline", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        batch = [pairs[i] for i in order[step * batch_size: (step + 1) * batch_size]]
        sums = train_batch(model, batch, teacher, cfg, tokenizer.pad_token_id)
        grad_norm = optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm)
        teacher.after_step()
        seconds = time.perf_counter() - t0
        record = dict(step=step + 1, epoch=step * batch_size // len(pairs), interactions=len(batch),
                      lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, seconds=seconds,
                      tokens_per_s=sums["tokens_processed"] / seconds, **sums)
        metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        done = step + 1
        if (every and done % every == 0) or (done == total and cfg.checkpoint.save_final):
            state = dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         teacher=teacher.state_dict(), data_position=done * batch_size)
            last_ckpt = ckpt.save_checkpoint(cfg.run_dir, done, model, tokenizer, state, cfg.checkpoint.keep_last)
    return last_ckpt


def _finish(cfg: TrainConfig, run: RunDir, metrics: MetricsLog, last_ckpt: str | None, total: int,
            num_pairs: int, report: dict) -> dict:
    run_dir, records = run.local, metrics.records()
    teacher_s = sum(r["teacher_s"] for r in records)
    busy = sum(r["teacher_s"] + r["student_s"] for r in records) or 1.0
    summary = dict(
        run_dir=run.location, steps_done=len(records), total_steps=total, interactions_available=num_pairs,
        interactions_trained=sum(r["interactions"] for r in records),
        rejected=report["rejected"],
        first_loss=records[0]["loss"] if records else None, final_loss=records[-1]["loss"] if records else None,
        mean_adv_first=records[0].get("adv_mean") if records else None,
        mean_adv_last=records[-1].get("adv_mean") if records else None,
        tokens_per_s=sum(r["tokens_processed"] for r in records) / max(sum(r["seconds"] for r in records), 1e-9),
        teacher_time_share=teacher_s / busy,
        checkpoint=last_ckpt or ckpt.latest_checkpoint(run.location) or "",
        metrics=str(metrics.path), plot=str(plot_metrics(records, run_dir / "metrics.png")) if records else None,
        precision={"trainer": precision.model_report(cfg)},
    )
    (run_dir / "summary.json").write_text(json.dumps(run.located(summary), indent=2))
    return summary

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
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rayuid import checkpoint as ckpt
from rayuid import precision
from rayuid.config import TrainConfig, dump_config
from rayuid.data.extract import extract_interactions
from rayuid.models import load_causal_lm, load_tokenizer, resolve_model
from rayuid.plots import plot_metrics
from rayuid.step import length_order, micro_step
from rayuid.teacher import TeacherWeights
from rayuid.templates import TemplateOptions, build_pair

log = logging.getLogger(__name__)
SAMPLE_DATA = "rayuid:sample"


def data_paths(paths: list[str]) -> list[str]:
    """``rayuid:sample`` names the conversations shipped inside the package."""
    sample = str(resources.files("rayuid") / "data" / "sample_conversations.jsonl")
    return [sample if p == SAMPLE_DATA else p for p in paths]


def load_pairs(cfg: TrainConfig, tokenizer) -> tuple[list, dict]:
    """Interactions → ScoringPairs (both contexts tokenised once) and the extraction report."""
    interactions, report = extract_interactions(data_paths(cfg.data.paths), cfg.data.extract)
    if cfg.data.max_interactions is not None:
        interactions = interactions[: cfg.data.max_interactions]
    t = cfg.template
    options = TemplateOptions(t.hindsight, t.max_prompt_tokens, t.max_response_tokens, t.append_eos)
    pairs = [build_pair(tokenizer, it, options) for it in tqdm(interactions, desc="tokenise", leave=False)]
    return pairs, report.to_json()


def example_order(num_examples: int, epochs: int, seed: int) -> list[int]:
    """Concatenated per-epoch permutations, each seeded by (seed, epoch)."""
    order: list[int] = []
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order += torch.randperm(num_examples, generator=gen).tolist()
    return order


def build_model(cfg: TrainConfig, resume_from: Path | None):
    """Full model or PEFT LoRA; from the base weights, or from a checkpoint's weights when resuming."""
    base_path = resolve_model(cfg.model.name)
    if cfg.model.lora is None:
        return load_causal_lm(str(resume_from or base_path), cfg.model.dtype)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_causal_lm(base_path, cfg.model.dtype)
    if resume_from is not None:
        model = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        lora = cfg.model.lora
        model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    model.eval()
    return model


def build_optimizer(model, cfg: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    warmup = math.ceil(o.warmup_ratio * total_steps)
    if o.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return optimizer, scheduler


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Clip, AdamW, schedule, zero grads; returns the pre-clip grad norm (also for FSDP2's sharded grads)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor when the grads are FSDP2 shards
        norm = norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def train_batch(model, batch: list, teacher: TeacherWeights, cfg: TrainConfig, pad_id: int) -> dict:
    """One optimizer step's worth of micro-batches (gradient accumulation); returns the step's metrics."""
    mb = cfg.optim.micro_batch_size
    batch = [batch[i] for i in length_order(batch)]  # less padding; the same gradient
    chunks = [batch[i: i + mb] for i in range(0, len(batch), mb)]
    sums: dict[str, float] = {}
    for chunk in chunks:
        stats = micro_step(model, chunk, teacher, cfg.loss, pad_id, len(chunk) / len(batch), cfg.model.compute_dtype)
        for key, value in stats.items():
            weight = 1.0 if key in ("teacher_s", "student_s", "tokens_processed", "tokens") else len(chunk) / len(batch)
            sums[key] = sums.get(key, 0.0) + weight * value
    return sums


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run (or resume) the offline trainer; returns the summary also written to ``RUN_DIR/summary.json``.

    ``stop_after``: end the process's work after that many optimizer steps (simulates an interruption in tests).
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    cfg = precision.decide_model(cfg)  # `auto` decided for this process's device
    log.info("offline trainer: %s", precision.model_report(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
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
    metrics = MetricsLog(run_dir / "metrics.jsonl", start)
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)
    loop = dict(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, teacher=teacher,
                pairs=pairs, order=order, batch_size=batch_size, metrics=metrics)
    last = _run_steps(cfg, start, end, total_steps, **loop)
    return _finish(cfg, run_dir, metrics, last, total_steps, len(pairs), report)


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
               teacher, pairs, order, batch_size, metrics) -> Path | None:
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


def _finish(cfg: TrainConfig, run_dir: Path, metrics: MetricsLog, last_ckpt: Path | None, total: int,
            num_pairs: int, report: dict) -> dict:
    records = metrics.records()
    teacher_s = sum(r["teacher_s"] for r in records)
    busy = sum(r["teacher_s"] + r["student_s"] for r in records) or 1.0
    summary = dict(
        run_dir=str(run_dir), steps_done=len(records), total_steps=total, interactions_available=num_pairs,
        interactions_trained=sum(r["interactions"] for r in records),
        rejected=report["rejected"],
        first_loss=records[0]["loss"] if records else None, final_loss=records[-1]["loss"] if records else None,
        mean_adv_first=records[0].get("adv_mean") if records else None,
        mean_adv_last=records[-1].get("adv_mean") if records else None,
        tokens_per_s=sum(r["tokens_processed"] for r in records) / max(sum(r["seconds"] for r in records), 1e-9),
        teacher_time_share=teacher_s / busy,
        checkpoint=str(last_ckpt or ckpt.latest_checkpoint(run_dir) or ""),
        metrics=str(metrics.path), plot=str(plot_metrics(records, run_dir / "metrics.png")) if records else None,
        precision={"trainer": precision.model_report(cfg)},
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

"""AdamW with the configured schedule, and the clipped optimizer step (plain torch: offline and Ray learners)."""

from __future__ import annotations

import math

import torch

from rayuid.config import TrainConfig


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

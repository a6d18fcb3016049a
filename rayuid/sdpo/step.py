"""One SDPO micro-step on a transformers model: teacher scores (no grad) → student log-probs → objective.

Used by the offline trainer and by the Ray learner. The teacher half is separate so that a caller which already
has teacher log-probs (e.g. from vLLM ``prompt_logprobs``) can skip it and pass them in.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch

from rayuid import precision
from rayuid.config import LossSettings, TrainConfig
from rayuid.data.templates import ScoringPair
from rayuid.sdpo.losses import SampledTokenOptions, distribution_loss, sampled_token_loss
from rayuid.sdpo.scoring import ScoreBatch, collate, response_logits, response_logprobs
from rayuid.sdpo.teacher_weights import TeacherWeights


def length_order(pairs: Sequence[ScoringPair]) -> list[int]:
    """Indices that put pairs of similar length into the same micro-batch, so fewer padding tokens are computed.

    Regrouping changes no gradient: every objective is a mean of per-sequence means (``masked_sequence_mean``) and
    each micro-batch is weighted by its share of the batch. Stable, so equal lengths keep their order.
    """
    return sorted(range(len(pairs)), key=lambda i: (len(pairs[i].student_prompt) + len(pairs[i].response),
                                                     len(pairs[i].teacher_prompt)))


def student_batch(pairs: Sequence[ScoringPair], pad_id: int) -> ScoreBatch:
    return collate([p.student_prompt for p in pairs], [p.response for p in pairs], pad_id)


def teacher_batch(pairs: Sequence[ScoringPair], pad_id: int) -> ScoreBatch:
    return collate([p.teacher_prompt for p in pairs], [p.response for p in pairs], pad_id)


def score_teacher(model, pairs: Sequence[ScoringPair], teacher: TeacherWeights, loss: LossSettings,
                  pad_id: int) -> torch.Tensor:
    """Teacher's view of the responses under x⊕o, no grad: log-probs (B, T), or logits (B, T, V) for KL kinds."""
    batch = teacher_batch(pairs, pad_id)
    with torch.no_grad(), teacher.applied():
        if loss.kind == "sampled_token":
            return response_logprobs(model, batch, loss.chunk_size)
        return response_logits(model, batch)


def sdpo_objective(model, pairs: Sequence[ScoringPair], teacher_scores: torch.Tensor, loss: LossSettings,
                   pad_id: int, old_lp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Student forward with grad and the configured objective; returns (scalar loss, stats)."""
    batch = student_batch(pairs, pad_id)
    if loss.kind == "sampled_token":
        student_lp = response_logprobs(model, batch, loss.chunk_size)
        options = SampledTokenOptions(loss.ignore_first_k, loss.center, loss.adv_clip, loss.ratio_clip)
        return sampled_token_loss(student_lp, teacher_scores, batch.mask, options, old_lp=old_lp)
    mask = batch.mask.clone()
    mask[:, : loss.ignore_first_k] = False
    student_logits = response_logits(model, batch)
    return distribution_loss(student_logits, teacher_scores, mask, kind=loss.kind, alpha=loss.alpha,
                             topk=loss.topk, add_tail=loss.add_tail, chunk_size=loss.chunk_size)


def autocast(model, compute_dtype: str):
    """bf16 autocast on the model's device type, or a no-op for float32 (``auto``: see ``rayuid.precision``)."""
    device = next(model.parameters()).device.type
    compute_dtype = precision.compute_dtype(compute_dtype, device, "model.compute_dtype")
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=getattr(torch, compute_dtype))


def micro_step(model, pairs: Sequence[ScoringPair], teacher: TeacherWeights, loss: LossSettings, pad_id: int,
               scale: float = 1.0, compute_dtype: str = "float32") -> dict[str, float]:
    """Teacher scoring + student loss + ``backward(loss * scale)``; returns stats incl. per-phase seconds."""
    t0 = time.perf_counter()
    with autocast(model, compute_dtype):
        teacher_scores = score_teacher(model, pairs, teacher, loss, pad_id)
    t1 = time.perf_counter()
    with autocast(model, compute_dtype):
        value, stats = sdpo_objective(model, pairs, teacher_scores, loss, pad_id)
    (value * scale).backward()
    t2 = time.perf_counter()
    tokens = sum(len(p.student_prompt) + len(p.response) for p in pairs)
    tokens += sum(len(p.teacher_prompt) + len(p.response) for p in pairs)
    return dict(stats, loss=float(value.detach()), teacher_s=t1 - t0, student_s=t2 - t1, tokens_processed=tokens)


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

"""SDPO losses: the paper's sampled-token estimator and SDPO-RLVR's distribution losses.

Paper (spec section 2): for a response y, A_i = stopgrad(log pi(y_i|x,o,y<i) - log pi(y_i|x,y<i))
and the loss is -sum_i A_i * log pi(y_i|x,y<i). Its expectation over y_i ~ pi is the
gradient of the reverse KL(student || stopgrad teacher) (Lemma B.1), which is what
`tests/test_losses.py` checks by enumeration. `distribution_loss` is the
SDPO-RLVR (verl) full-/top-k-logit alternative (spec section 7.2).

Every loss here aggregates like the official code: mean over a sequence's valid
tokens, then mean over sequences that have at least one valid token. Masked
positions are replaced (`torch.where`), never multiplied by 0, so garbage or inf in
padding cannot turn into NaN values or gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor

from rayuid.sdpo.logprobs import token_logprobs, token_logprobs_from_logits

__all__ = [
    "SampledTokenOptions", "distribution_loss", "ema_update_", "masked_sequence_mean",
    "sampled_token_loss", "token_logprobs", "token_logprobs_from_logits",
]

DISTRIBUTION_KINDS = ("reverse_kl", "forward_kl", "jsd")


def masked_sequence_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """(B, T) values, (B, T) mask -> scalar.

    Per-sequence token mean first, so long responses do not dominate the batch
    (the official trainers do this); sequences with no valid token are left out
    of the batch mean instead of counting as 0. Returns 0 if nothing is valid.
    """
    valid = mask.bool()
    values = torch.where(valid, per_token, 0)
    counts = valid.sum(-1)
    per_seq = values.sum(-1) / counts.clamp_min(1)
    has_tokens = counts > 0
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)


@dataclass(frozen=True)
class SampledTokenOptions:
    """Knobs of the sampled-token estimator; defaults are the paper's plain estimator.

    ignore_first_k: drop the first k valid response tokens from signal and loss
        (the offline code uses 2: the first tokens' hindsight ratio is mostly template noise).
    center: subtract each sequence's mean advantage (online code; a per-sequence baseline).
    adv_clip: clamp the (possibly centred) advantage to [-c, c] (v0 offline code).
    ratio_clip: PPO epsilon; needs old_lp. Only matters when several updates reuse a rollout.
    """

    ignore_first_k: int = 0
    center: bool = False
    adv_clip: float | None = None
    ratio_clip: float | None = None


def _drop_first_k(mask: Tensor, k: int) -> Tensor:
    """(B, T) bool -> (B, T) bool without each row's first k valid tokens (valid may not start at 0)."""
    if k <= 0:
        return mask
    return mask & (mask.long().cumsum(-1) > k)


def _advantages(student_lp: Tensor, teacher_lp: Tensor, valid: Tensor,
                options: SampledTokenOptions) -> Tensor:
    """(B, T) detached advantages, exactly 0 at invalid positions."""
    adv = torch.where(valid, teacher_lp.detach() - student_lp.detach(), 0)
    if options.center:
        counts = valid.sum(-1, keepdim=True).clamp_min(1)
        adv = torch.where(valid, adv - adv.sum(-1, keepdim=True) / counts, 0)
    if options.adv_clip is not None:
        adv = adv.clamp(-options.adv_clip, options.adv_clip)
    return adv


@torch.no_grad()
def _advantage_stats(adv: Tensor, valid: Tensor) -> dict[str, float]:
    """Scalar summaries of the advantage actually used, over valid tokens only."""
    n = valid.sum()
    denom = n.clamp_min(1).to(adv.dtype)
    mean = adv.sum() / denom
    var = torch.where(valid, (adv - mean) ** 2, 0).sum() / denom
    positions = torch.arange(adv.shape[-1], device=adv.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(-1, keepdim=True)
    has = last.squeeze(-1) >= 0
    eos = adv.gather(-1, last.clamp_min(0)).squeeze(-1)
    eos_mean = (eos * has).sum() / has.sum().clamp_min(1)
    values = torch.stack([mean, var.sqrt(), adv.abs().sum() / denom, eos_mean, n.to(adv.dtype)])
    keys = ("adv_mean", "adv_std", "adv_abs_mean", "adv_eos_mean", "tokens")
    return dict(zip(keys, values.tolist()))


def sampled_token_loss(student_lp: Tensor, teacher_lp: Tensor, mask: Tensor,
                       options: SampledTokenOptions = SampledTokenOptions(),
                       old_lp: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The paper's estimator: per token -A * log pi_student, A = stopgrad(teacher - student).

    Args:
        student_lp: (B, T) log pi(y_i | x, y<i), with grad.
        teacher_lp: (B, T) log pi(y_i | x, o, y<i); detached here, so the teacher
            may be the live model.
        mask: (B, T) bool / 0-1 over response tokens.
        options: see SampledTokenOptions.
        old_lp: (B, T) behaviour log-probs, required iff options.ratio_clip is set.
            With ratio clipping the per-token loss is -min(r*A, clip(r)*A), whose
            value differs from -A*lp but whose gradient equals it when r == 1.

    Returns:
        (scalar loss, stats) with stats 'adv_mean', 'adv_std', 'adv_abs_mean',
        'adv_eos_mean' (advantage at each sequence's last valid token, averaged over
        sequences), 'tokens' (valid count), all after ignore_first_k / center /
        adv_clip; plus 'clip_frac' when ratio_clip is set.
    """
    if options.ratio_clip is not None and old_lp is None:
        raise ValueError("SampledTokenOptions.ratio_clip needs old_lp (behaviour log-probs)")
    valid = _drop_first_k(mask.bool(), options.ignore_first_k)
    adv = _advantages(student_lp, teacher_lp, valid, options)
    lp = torch.where(valid, student_lp, 0)  # padding garbage never reaches exp() below
    stats: dict[str, float] = {}
    if options.ratio_clip is None:
        per_token = -adv * lp
    else:
        eps = options.ratio_clip
        ratio = torch.exp(lp - torch.where(valid, old_lp.detach(), 0))
        clipped = ratio.clamp(1.0 - eps, 1.0 + eps)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        with torch.no_grad():
            is_clipped = valid & (ratio * adv > clipped * adv)
            stats["clip_frac"] = (is_clipped.sum() / valid.sum().clamp_min(1)).item()
    loss = masked_sequence_mean(per_token, valid)
    return loss, {**_advantage_stats(adv, valid), **stats}


def _log_tail(bucket_lp: Tensor) -> Tensor:
    """(c, k) top-k log-probs -> (c, 1) log(1 - sum p_topk).

    Clamped at the dtype's smallest normal number: with k == V (or a peaked
    distribution) 1 - sum p rounds to <= 0, and log(0) would make KL terms NaN.
    """
    log_mass = torch.logsumexp(bucket_lp, dim=-1, keepdim=True)
    return torch.log((-torch.expm1(log_mass)).clamp_min(torch.finfo(bucket_lp.dtype).tiny))


def _restrict_topk(s_lp: Tensor, t_lp: Tensor, topk: int,
                   add_tail: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c, V) log-probs -> (c, k[+1]) log-probs on the student's top-k ids (verl's scheme),
    plus the (c,) student / teacher probability mass on those ids (detached, for stats)."""
    ids = s_lp.detach().topk(topk, dim=-1).indices
    s_k, t_k = s_lp.gather(-1, ids), t_lp.gather(-1, ids)
    s_mass, t_mass = (x.detach().logsumexp(-1).exp() for x in (s_k, t_k))
    if add_tail:
        s_k, t_k = torch.cat([s_k, _log_tail(s_k)], -1), torch.cat([t_k, _log_tail(t_k)], -1)
    else:
        s_k, t_k = s_k.log_softmax(-1), t_k.log_softmax(-1)
    return s_k, t_k, s_mass, t_mass


def _kl(p_lp: Tensor, q_lp: Tensor) -> Tensor:
    """(c, K) log-probs -> (c,) KL(p || q)."""
    return (p_lp.exp() * (p_lp - q_lp)).sum(-1)


def _divergence(s_lp: Tensor, t_lp: Tensor, kind: str, alpha: float) -> Tensor:
    """(c, K) student / teacher log-probs -> (c,) per-position divergence."""
    if kind == "reverse_kl":
        return _kl(s_lp, t_lp)
    if kind == "forward_kl":
        return _kl(t_lp, s_lp)
    # Mixture in log space; log(0) = -inf is fine (logsumexp ignores it), which
    # makes alpha in {0, 1} give exactly 0 rather than NaN.
    log_w = [math.log(w) if w > 0 else -math.inf for w in (1.0 - alpha, alpha)]
    m_lp = torch.logsumexp(torch.stack([s_lp + log_w[0], t_lp + log_w[1]]), dim=0)
    return (1.0 - alpha) * _kl(s_lp, m_lp) + alpha * _kl(t_lp, m_lp)


def _chunk_divergence(s_logits: Tensor, t_logits: Tensor, valid: Tensor, kind: str, alpha: float,
                      topk: int | None, add_tail: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(c, V) logits, (c,) valid -> (c,) divergence, (c,) student / teacher top-k mass (detached).

    Invalid rows are zeroed before the softmax so that garbage there cannot make
    inf/NaN gradients (a masked NaN still poisons the backward of a product).
    """
    dtype = torch.promote_types(s_logits.dtype, torch.float32)
    s_lp = torch.where(valid[:, None], s_logits, 0).to(dtype).log_softmax(-1)
    t_lp = torch.where(valid[:, None], t_logits, 0).to(dtype).log_softmax(-1)
    s_mass = t_mass = s_lp.new_ones(s_lp.shape[0])
    if topk is not None:
        s_lp, t_lp, s_mass, t_mass = _restrict_topk(s_lp, t_lp, topk, add_tail)
    return _divergence(s_lp, t_lp, kind, alpha), s_mass, t_mass


def _check_distribution_args(kind: str, alpha: float, topk: int | None, vocab: int,
                             chunk_size: int) -> None:
    """Fail early with a message naming the allowed values."""
    if kind not in DISTRIBUTION_KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(DISTRIBUTION_KINDS)}")
    if kind == "jsd" and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"jsd alpha must be in [0, 1], got {alpha}")
    if topk is not None and not 1 <= topk <= vocab:
        raise ValueError(f"topk must be in [1, V={vocab}] or None, got {topk}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def distribution_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                      kind: str = "reverse_kl", alpha: float = 0.5, topk: int | None = None,
                      add_tail: bool = True, chunk_size: int = 1024) -> tuple[Tensor, dict[str, float]]:
    """Full- or top-k-logit self-distillation loss (SDPO-RLVR, spec section 7.2).

    Args:
        student_logits: (B, T, V) with grad.
        teacher_logits: (B, T, V); detached here.
        mask: (B, T) bool / 0-1 over response tokens.
        kind: "reverse_kl" KL(student||teacher), "forward_kl" KL(teacher||student), or
            "jsd": (1-alpha) KL(student||M) + alpha KL(teacher||M), M = (1-alpha) S + alpha T.
            Unnormalised like verl, so alpha in {0, 1} gives 0; jsd / alpha -> forward KL
            as alpha -> 0 and jsd / (1 - alpha) -> reverse KL as alpha -> 1 (verl's
            alpha=0 / alpha=1 settings are the "forward_kl" / "reverse_kl" kinds here).
        topk: restrict to the student's top-k ids per position, teacher gathered there.
        add_tail: append a log(1 - sum p_topk) bucket to both; else renormalise over top-k.
        chunk_size: positions per checkpointed chunk. Only one chunk's fp32 log-softmax
            pair is alive at a time, in forward and in backward.

    Returns:
        (scalar loss, stats) with 'div_mean' (token mean over valid tokens), 'tokens',
        and with topk also 'student_topk_mass' / 'teacher_topk_mass'.
    """
    vocab = student_logits.shape[-1]
    _check_distribution_args(kind, alpha, topk, vocab, chunk_size)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher shape {tuple(teacher_logits.shape)} != student "
                         f"{tuple(student_logits.shape)}")
    valid = mask.bool()
    flat_valid = valid.reshape(-1)
    s_chunks = student_logits.reshape(-1, vocab).split(chunk_size)
    t_chunks = teacher_logits.detach().reshape(-1, vocab).split(chunk_size)
    use_ckpt = torch.is_grad_enabled() and student_logits.requires_grad
    outs = []
    for s, t, v in zip(s_chunks, t_chunks, flat_valid.split(chunk_size)):
        args = (s, t, v, kind, alpha, topk, add_tail)
        if use_ckpt:
            outs.append(torch.utils.checkpoint.checkpoint(_chunk_divergence, *args, use_reentrant=False))
        else:
            outs.append(_chunk_divergence(*args))
    div, s_mass, t_mass = (torch.cat(parts).reshape(valid.shape) for parts in zip(*outs))
    loss = masked_sequence_mean(div, valid)
    with torch.no_grad():
        n = valid.sum()
        values = [torch.where(valid, x, 0).sum() / n.clamp_min(1) for x in (div, s_mass, t_mass)]
        keys = ("div_mean", "student_topk_mass", "teacher_topk_mass", "tokens")
        stats = dict(zip(keys, torch.stack([*values, n.to(div.dtype)]).tolist()))
    if topk is None:
        del stats["student_topk_mass"], stats["teacher_topk_mass"]
    return loss, stats


@torch.no_grad()
def ema_update_(target_params: Iterable[Tensor], source_params: Iterable[Tensor],
                rate: float) -> None:
    """theta_T <- (1 - rate) theta_T + rate theta, in place (SDPO-RLVR EMA teacher, tau ~ 0.01-0.05).

    Shapes are checked explicitly because lerp_ would silently broadcast a wrong pairing.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
    for target, source in zip(list(target_params), list(source_params), strict=True):
        if target.shape != source.shape:
            raise ValueError(f"EMA shape mismatch: {tuple(target.shape)} vs {tuple(source.shape)}")
        target.lerp_(source.to(device=target.device, dtype=target.dtype), rate)

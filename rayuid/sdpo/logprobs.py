"""Per-token log-probabilities without materialising the full (N, V) logits.

SDPO only ever needs log pi(y_i | ...) at the realised tokens, for the student
(with grad) and for the hindsight teacher (no grad). With Qwen3's vocabulary
(V = 151,936) a 4,096-token response has a 2.5 GB fp32 logit matrix, and the
naive `log_softmax(h @ W.T).gather(...)` keeps two or three such matrices alive
through backward. Here positions are processed in chunks: forward keeps only the
per-position logsumexp (N,), and backward recomputes each chunk's logits, so peak
extra memory is O(chunk_size * V) instead of O(N * V).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor

__all__ = ["token_logprobs", "token_logprobs_from_logits"]


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(c, H) x (V, H) -> (c, V) float32 logits.

    The matmul runs in the weight's dtype (as the model's lm_head would), the
    softmax maths in float32 (bf16 logsumexp over 150k entries loses ~3 digits).
    Autocast is disabled so forward and backward recompute identical logits.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.to(weight.dtype) @ weight.T
        if bias is not None:
            logits = logits + bias.to(weight.dtype)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _logsumexp_inplace_(logits: Tensor) -> Tensor:
    """(c, V) -> (c,) logsumexp, destroying `logits`.

    torch.logsumexp allocates a second (c, V) buffer for exp(x - max); doing it in
    place halves the forward peak, which is the whole point of this module.
    """
    row_max = logits.amax(-1, keepdim=True)
    return logits.sub_(row_max).exp_().sum(-1).log_().add_(row_max.squeeze(-1))


class _ChunkedTokenLogprob(torch.autograd.Function):
    """Autograd op hidden (N, H), weight (V, H), bias (V,)|None, targets (N,) -> (N,) fp32.

    A custom Function (rather than per-chunk checkpointing) lets backward write
    straight into one (V, H) weight-gradient buffer instead of having autograd
    sum per-chunk (V, H) gradients, and saves only the (N,) logsumexp.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                targets: Tensor, chunk_size: int) -> Tensor:
        n = hidden.shape[0]
        out_dtype = torch.promote_types(weight.dtype, torch.float32)
        logprobs = torch.empty(n, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(n, dtype=out_dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[sl], weight, bias)
            target_logit = logits.gather(-1, targets[sl, None]).squeeze(-1)
            lse[sl] = _logsumexp_inplace_(logits)
            logprobs[sl] = target_logit - lse[sl]
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype  # accumulate weight/bias grads in >= fp32 across chunks
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            g = grad_out[sl].to(acc)
            # d log p(t) / d logits = onehot(t) - softmax; built in place in the logits buffer.
            dlogits = _chunk_logits(hidden[sl], weight, bias)
            dlogits.sub_(lse[sl, None]).exp_().mul_(-g[:, None])
            dlogits.scatter_add_(-1, targets[sl, None], g[:, None])
            if need_h:
                grad_h[sl] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dlogits.T, hidden[sl].to(acc))
            if need_b:
                grad_b.add_(dlogits.sum(0))
            del dlogits
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                   chunk_size: int = 1024, bias: Tensor | None = None) -> Tensor:
    """log p(target) from final hidden states, never holding all logits at once.

    Args:
        hidden: (..., H) final hidden states (e.g. (B, T, H)), already aligned so
            that hidden[..., i, :] predicts targets[..., i].
        weight: (V, H) lm_head weight (the tied embedding for tied models).
        targets: (...) token ids in [0, V). Padding positions must still hold a
            valid id; mask them downstream.
        chunk_size: positions per chunk; peak extra memory is one (chunk_size, V) fp32
            buffer (plus its bf16 twin for bf16 weights) and, in backward, the (V, H) grad.
        bias: optional (V,) lm_head bias.

    Returns:
        (...) log-probabilities in float32 (float64 if the weight is float64),
        differentiable w.r.t. hidden, weight and bias. The weight gradient is
        accumulated in float32 (one extra (V, H) fp32 buffer during backward) so
        bf16 weights do not lose precision summing many chunks.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).long()
    out = _ChunkedTokenLogprob.apply(flat_h, weight, bias, flat_t, chunk_size)
    return out.reshape(targets.shape)


def _logits_chunk_logprob(logits: Tensor, targets: Tensor) -> Tensor:
    """(c, V), (c,) -> (c,) log p(target) in >= float32, no full log_softmax copy."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs_from_logits(logits: Tensor, targets: Tensor, *,
                               chunk_size: int = 1024) -> Tensor:
    """log p(target) from already-computed logits, chunked over positions.

    For callers that already hold logits (e.g. a model returning them). Each
    chunk is checkpointed so autograd saves no per-chunk fp32 copy; backward
    recomputes it. The (N, V) gradient of `logits` itself is unavoidable.

    Args:
        logits: (..., V), any float dtype.
        targets: (...) token ids in [0, V).
        chunk_size: positions per chunk.

    Returns:
        (...) float32 (float64 for float64 logits) log-probabilities.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    flat_t = targets.reshape(-1).long()
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for lg, tg in zip(flat.split(chunk_size), flat_t.split(chunk_size)):
        if use_ckpt:
            parts.append(torch.utils.checkpoint.checkpoint(
                _logits_chunk_logprob, lg, tg, use_reentrant=False))
        else:
            parts.append(_logits_chunk_logprob(lg, tg))
    if not parts:
        return flat.new_zeros(targets.shape, dtype=torch.float32)
    return torch.cat(parts).reshape(targets.shape)

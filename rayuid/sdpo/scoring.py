"""Per-token log-probs of given responses under given prompts, with a transformers causal LM.

A batch row is ``prompt ⊕ response``, right-padded. The hidden state at position p predicts token p+1, so the
response token j (at absolute index s+j, s = prompt length) is scored by the hidden state at s+j−1. Only those
hidden states go through the LM head, in chunks (``rayuid.sdpo.logprobs.token_logprobs``): the (T×V) logits of the
prompt are never computed, and neither are all response logits at once. A model whose head is not a plain linear
layer (``final_logit_softcapping`` or ``logit_scale`` in its config) runs its own full forward instead, and the
logits at the scoring positions are picked from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rayuid.sdpo.logprobs import token_logprobs, token_logprobs_from_logits


@dataclass
class ScoreBatch:
    """Padded model inputs plus the response positions to score.

    input_ids, attention_mask: (B, L); positions, targets, mask: (B, T) with T = longest response.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> ScoreBatch:
    """Right-pad ``prompt ⊕ response`` rows; padding never reaches a scored position (mask is explicit)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many prompts and responses (got {len(prompts)} and {len(responses)})")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    steps = max(max(len(r) for r in responses), 1)
    bsz = len(rows)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, width), dtype=torch.long)
    positions = torch.zeros((bsz, steps), dtype=torch.long)
    targets = torch.full((bsz, steps), pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, steps), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if not prompt:
            raise ValueError("a prompt must hold at least one token (the response's first token is predicted from it)")
        input_ids[i, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, : len(rows[i])] = 1
        n = len(response)
        positions[i, :n] = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
        targets[i, :n] = torch.tensor(list(response), dtype=torch.long)
        mask[i, :n] = True
    return ScoreBatch(input_ids, attention_mask, positions, targets, mask)


def _unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _uses_plain_lm_head(hf_model) -> bool:
    cfg = hf_model.config
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def response_hidden(model, batch: ScoreBatch) -> torch.Tensor:
    """Final hidden states at the scoring positions: (B, T, H)."""
    hf_model = _unwrap(model)
    out = hf_model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    index = batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def response_logprobs(model, batch: ScoreBatch, chunk_size: int = 1024) -> torch.Tensor:
    """log π(response_j | prompt, response_<j): (B, T), zero where ``batch.mask`` is False. Grad flows if enabled."""
    hf_model = _unwrap(model)
    if not _uses_plain_lm_head(hf_model):
        logits = response_logits(model, batch)
        return token_logprobs_from_logits(logits, batch.targets, chunk_size=chunk_size) * batch.mask
    head = hf_model.get_output_embeddings()
    lp = token_logprobs(response_hidden(model, batch), head.weight, batch.targets,
                        chunk_size=chunk_size, bias=getattr(head, "bias", None))
    return lp * batch.mask


def response_logits(model, batch: ScoreBatch) -> torch.Tensor:
    """Full-vocabulary logits at the scoring positions (B, T, V), for distribution-level losses."""
    hf_model = _unwrap(model)
    if _uses_plain_lm_head(hf_model):
        return hf_model.get_output_embeddings()(response_hidden(model, batch))
    logits = hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    index = batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, index)

"""Per-token response log-probs: equal to a plain full forward, independent of padding and batch mates."""

from __future__ import annotations

import pytest
import torch

from rayuid.sdpo.models import load_causal_lm
from rayuid.sdpo.scoring import collate, response_logits, response_logprobs


def _naive(model, prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    start = len(prompt)
    return torch.stack([logp[start + j - 1, tok] for j, tok in enumerate(response)]).float()


ROWS = [([3, 40, 41, 42], [50, 51, 52, 53, 2]), ([3, 60], [70, 2]), ([3, 9, 9, 9, 9, 9, 9], [11, 12, 13])]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_response_logprobs_match_a_full_forward(arch, tiny_model_dir, tiny_llama_dir):
    model = load_causal_lm(tiny_model_dir if arch == "qwen2" else tiny_llama_dir)
    batch = collate([p for p, _ in ROWS], [r for _, r in ROWS], pad_id=0)
    with torch.no_grad():
        lp = response_logprobs(model, batch, chunk_size=2)
    for i, (prompt, response) in enumerate(ROWS):
        assert torch.allclose(lp[i, : len(response)], _naive(model, prompt, response), atol=1e-5)
        assert torch.all(lp[i, len(response):] == 0)
    assert batch.mask.sum().item() == sum(len(r) for _, r in ROWS)


def test_batch_mates_and_padding_do_not_change_a_row(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    alone = collate([ROWS[1][0]], [ROWS[1][1]], pad_id=0)
    mixed = collate([p for p, _ in ROWS], [r for _, r in ROWS], pad_id=7)
    with torch.no_grad():
        a = response_logprobs(model, alone)[0, :2]
        b = response_logprobs(model, mixed)[1, :2]
        logits = response_logits(model, mixed)
    assert torch.allclose(a, b, atol=1e-6)
    gathered = torch.log_softmax(logits, -1).gather(-1, mixed.targets.unsqueeze(-1)).squeeze(-1) * mixed.mask
    assert torch.allclose(gathered, response_logprobs(model, mixed).detach(), atol=1e-5)


def test_gradients_flow_through_peft_lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = collate([ROWS[0][0]], [ROWS[0][1]], pad_id=0)
    response_logprobs(model, batch).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(response_logprobs(merged, batch)[0], _naive(merged, *ROWS[0]), atol=1e-5)


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="equally many"):
        collate([[1]], [[2], [3]], 0)
    with pytest.raises(ValueError, match="at least one token"):
        collate([[]], [[2]], 0)

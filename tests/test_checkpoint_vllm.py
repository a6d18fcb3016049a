"""A trainer checkpoint is a model vLLM serves: its prompt log-probs equal transformers' within 1e-4."""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.mark.slow
def test_trained_checkpoint_loads_in_vllm(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from rayuid.config import TrainConfig
    from rayuid.offline.trainer import train
    from rayuid.sdpo.models import load_causal_lm

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"c{i}:1", "conversation_id": f"c{i}", "turn": 1,
                                          "context": [{"role": "user", "content": f"Question {i}?"}],
                                          "response": "The quick brown fox.", "followup": "Too long."})
                              for i in range(4)))
    cfg = TrainConfig.model_validate(dict(run_dir=str(tmp_path / "run"), model={"name": tiny_model_dir},
                                          data={"paths": [str(data)]}, optim={"lr": 1e-2, "max_steps": 1, "warmup_ratio": 0.0,
                                                                              "micro_batch_size": 4, "grad_accum_steps": 1}))
    ckpt = train(cfg)["checkpoint"]
    ids = [1, 40, 41, 42, 43, 44, 45, 2]
    llm = LLM(model=ckpt, dtype="float32", enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=64 << 20)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    served = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    model = load_causal_lm(ckpt)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    reference = torch.stack([logp[i - 1, ids[i]] for i in range(1, len(ids))])
    base = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        base_logp = torch.log_softmax(base(torch.tensor([ids])).logits[0], -1)
    before = torch.stack([base_logp[i - 1, ids[i]] for i in range(1, len(ids))])
    assert torch.allclose(served, reference, atol=1e-4)
    assert (served - before).abs().max() > 1e-3  # vLLM serves the trained weights, not the base
    del llm
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"

"""`rayuid export`: every kind of run's weights as a folder transformers, peft (and vLLM) load, for serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rayuid.offline.export import ExportError, export
from rayuid.sdpo.models import load_causal_lm

IDS = torch.tensor([[1, 40, 41, 42, 43, 44]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _offline_run(tmp_path, model_dir, lora: bool) -> Path:
    """Two steps of the offline trainer on the shipped sample, checkpointing both."""
    from rayuid.config import TrainConfig
    from rayuid.offline.trainer import train

    run_dir = tmp_path / ("lora" if lora else "full")
    cfg = {"run_dir": str(run_dir), "seed": 3, "threads": 1, "model": {"name": model_dir},
           "template": {"max_prompt_tokens": 128, "max_response_tokens": 48},
           "optim": {"lr": 1e-2, "micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 2, "warmup_ratio": 0.0},
           "checkpoint": {"every_steps": 1, "keep_last": 5}}
    if lora:
        cfg["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    train(TrainConfig.model_validate(cfg))
    return run_dir


def test_full_model_export_loads_in_transformers_without_resume_state(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _offline_run(tmp_path, tiny_model_dir, lora=False)
    out = export(run, tmp_path / "served")
    assert not (out / "trainer_state.pt").exists() and (out / "tokenizer_config.json").exists()
    served = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002")
    assert torch.equal(_logits(served), _logits(trained))
    assert not torch.allclose(_logits(served), _logits(load_causal_lm(tiny_model_dir)))  # the trained weights
    older = export(run, tmp_path / "step1", step=1)
    assert not torch.equal(_logits(AutoModelForCausalLM.from_pretrained(older)), _logits(served))
    assert AutoTokenizer.from_pretrained(out).encode("hello")


def test_lora_export_loads_in_peft_and_merges_into_a_full_model(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _offline_run(tmp_path, tiny_model_dir, lora=True)
    adapter = export(run, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(adapter))
    merged_dir = export(run, tmp_path / "merged", merge_lora=True)
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert (_logits(merged) - _logits(peft_model)).abs().max().item() < 1e-5
    assert (_logits(merged) - _logits(load_causal_lm(tiny_model_dir))).abs().max().item() > 1e-4


def _per_user_run(tmp_path, model_dir) -> Path:
    """The layout a per-user Ray run leaves: adapters/<user>/v<N> and the checkpoint naming each user's version."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "users"
    for user, version in {"ann": 2, "ben": 1}.items():
        lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)  # B != 0: a trained adapter
        model = get_peft_model(load_causal_lm(model_dir), lora)
        model.save_pretrained(run / "adapters" / user / f"v{version:06d}")
        (run / "adapters" / user / f"v{version:06d}" / "adapter_state.pt").write_bytes(b"resume state")
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "driver_state.json").write_text(json.dumps(
        {"step": 2, "versions": {"ann": 2, "ben": 1}}))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": model_dir}}))
    return run


def test_per_user_export_takes_the_users_checkpointed_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel

    run = _per_user_run(tmp_path, tiny_model_dir)
    with pytest.raises(ExportError, match=r"pass --user, one of \['ann', 'ben'\]"):
        export(run, tmp_path / "x")
    out = export(run, tmp_path / "ann", user="ann")
    assert not (out / "adapter_state.pt").exists() and (out / "tokenizer_config.json").exists()
    served = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(out))
    saved = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(run / "adapters" / "ann" / "v000002"))
    assert torch.equal(_logits(served), _logits(saved))
    merged = export(run, tmp_path / "ben-merged", user="ben", merge_lora=True)
    assert (merged / "config.json").exists()


def test_a_run_without_checkpoints_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, "-m", "rayuid.cli", "export", str(tmp_path / "empty"), "--to",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "no complete checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_vllm_serves_an_export(tmp_path, tiny_model_dir):
    from rayuid.config import EngineSettings
    from rayuid.sdpo.scoring import collate, response_logprobs
    from rayuid.system.engine import VllmEngine

    run = _offline_run(tmp_path, tiny_model_dir, lora=False)
    out = export(run, tmp_path / "served")
    engine = VllmEngine(str(out), EngineSettings(max_model_len=256, kv_cache_memory_bytes=32 << 20), seed=0)
    prompts, responses = [[1, 40, 41, 42]], [[50, 51, 52]]
    with torch.no_grad():
        ref = response_logprobs(load_causal_lm(str(out)), collate(prompts, responses, pad_id=0))[0].tolist()
    try:
        assert max(abs(a - b) for a, b in zip(engine.score(prompts, responses)[0], ref)) < 1e-4
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's group is left: a learner group can start here next


def test_export_never_replaces_the_run_it_reads(tmp_path, tiny_model_dir):
    run = _per_user_run(tmp_path, tiny_model_dir)
    for target in (run, tmp_path):
        with pytest.raises(ExportError, match="would be replaced"):
            export(run, target, user="ann")
    assert (run / "adapters" / "ann" / "v000002" / "adapter_config.json").exists()

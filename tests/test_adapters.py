"""Per-user LoRA adapters: isolation between users, PEFT-loadable exports, exact resume, the on-disk store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayuid.config import TrainConfig
from rayuid.data.extract import Interaction
from rayuid.data.templates import build_pair
from rayuid.personal.adapters import AdapterStore, UserAdapters, check_user_id


def _pairs(tokenizer, tag: str, n: int = 4) -> list:
    return [build_pair(tokenizer, Interaction(f"{tag}{i}:1", f"{tag}{i}", 1,
                                              [{"role": "user", "content": f"Explain idea {i} to {tag}."}],
                                              "Sure! Here is a long answer with many words. " * (1 + i % 2),
                                              "Way too long. One short sentence please."))
            for i in range(n)]


def _cfg(model_dir: str, **over) -> TrainConfig:
    raw = dict(seed=3, model={"name": model_dir, "lora": {"r": 4, "alpha": 8}},
               template={"max_prompt_tokens": 128, "max_response_tokens": 64},
               optim={"lr": 5e-3, "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_ratio": 0.0,
                      "schedule": "constant"})
    raw.update(over)
    return TrainConfig.model_validate(raw)


def _diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((torch.tensor(x) - torch.tensor(y)).abs().max().item() for x, y in zip(a, b))


def test_training_one_user_leaves_other_users_and_the_base_bit_identical(tiny_model_dir, tiny_tokenizer):
    ua = UserAdapters(_cfg(tiny_model_dir), total_steps=10)
    probe = _pairs(tiny_tokenizer, "probe")
    base_lp = ua.response_logprobs(None, probe)
    ua.ensure("alice")
    ua.ensure("bob")
    assert _diff(ua.response_logprobs("bob", probe), base_lp) < 1e-6  # a fresh adapter is the base model (B = 0)
    bob_bytes, bob_lp = bytes(ua.export("bob").data), ua.response_logprobs("bob", probe)
    for _ in range(3):
        stats = ua.train_step("alice", _pairs(tiny_tokenizer, "alice"))
    assert stats["version"] == 3 and ua.versions == {"alice": 3, "bob": 0}
    assert bytes(ua.export("bob").data) == bob_bytes                            # B's adapter bytes unchanged
    assert ua.response_logprobs("bob", probe) == bob_lp                   # B's log-probs unchanged, exactly
    assert ua.response_logprobs(None, probe) == base_lp                   # the base model unchanged, exactly
    assert _diff(ua.response_logprobs("alice", probe), base_lp) > 1e-3   # A did learn


def test_exported_adapter_loads_in_peft_and_reproduces_the_learner(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from rayuid.sdpo.models import load_causal_lm
    from rayuid.sdpo.scoring import response_logprobs
    from rayuid.sdpo.step import student_batch

    ua = UserAdapters(_cfg(tiny_model_dir), total_steps=10)
    ua.train_step("carol", _pairs(tiny_tokenizer, "carol"))
    ua.train_step("dave", _pairs(tiny_tokenizer, "dave"))
    folder = ua.save(AdapterStore(tmp_path), "carol")
    assert Path(folder) == tmp_path / "carol" / "v000001"
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(folder))
    probe = _pairs(tiny_tokenizer, "probe")
    with torch.no_grad():
        lp = response_logprobs(model, student_batch(probe, tiny_tokenizer.pad_token_id))
    expected = [lp[i, : len(p.response)].tolist() for i, p in enumerate(probe)]
    assert _diff(ua.response_logprobs("carol", probe), expected) < 1e-5


@pytest.mark.parametrize("teacher", ["live", "ema"])
def test_resume_with_several_users_continues_exactly(tiny_model_dir, tiny_tokenizer, tmp_path, teacher):
    cfg = _cfg(tiny_model_dir, teacher={"weights": teacher})
    store = AdapterStore(tmp_path)
    data = {u: _pairs(tiny_tokenizer, u) for u in ("ann", "ben", "cat")}
    first = UserAdapters(cfg, total_steps=10)
    for user in data:
        first.train_step(user, data[user])
    first.train_step("ann", data["ann"])
    for user in data:
        first.save(store, user)
    resumed = UserAdapters(cfg, total_steps=10)
    for user in store.users():
        resumed.load(user, store.latest(user))
    assert resumed.versions == {"ann": 2, "ben": 1, "cat": 1}
    for ua in (first, resumed):
        ua.train_step("ben", data["ben"])
        ua.train_step("ann", data["ann"])
    probe = _pairs(tiny_tokenizer, "probe")
    for user in data:
        assert _diff(first.response_logprobs(user, probe), resumed.response_logprobs(user, probe)) < 1e-6


def test_store_lists_complete_versions_and_prunes(tiny_model_dir, tiny_tokenizer, tmp_path):
    ua = UserAdapters(_cfg(tiny_model_dir), total_steps=10)
    store = AdapterStore(tmp_path)
    for _ in range(3):
        ua.train_step("eve", _pairs(tiny_tokenizer, "eve", 2))
        ua.save(store, "eve")
    (tmp_path / "eve" / "v000009").mkdir()               # a half-written version (no state file) is ignored
    assert store.versions("eve") == [1, 2, 3] and store.latest("eve").endswith("/v000003")
    store.prune("eve", keep_last=1, keep={1})
    assert store.versions("eve") == [1, 3] and store.users() == ["eve"]


def test_bad_user_ids_and_missing_lora_say_what_to_do(tiny_model_dir):
    assert check_user_id("user_42-b") == "user_42-b"
    for bad in ("", "a.b", "x" * 65, "me@example.com"):
        with pytest.raises(ValueError, match="letters, digits"):
            check_user_id(bad)
    with pytest.raises(ValueError, match="model.lora"):
        UserAdapters(TrainConfig.model_validate({"model": {"name": tiny_model_dir}}), total_steps=1)

"""The vLLM engine wrapper against transformers: sampled log-probs, prefill scoring, full and LoRA weight loads."""

from __future__ import annotations

import pytest
import torch

from rayuid.config import EngineSettings, SamplingSettings
from rayuid.sdpo.models import load_causal_lm
from rayuid.sdpo.scoring import collate, response_logprobs
from rayuid.sdpo.weights import pack_state_dict

pytestmark = pytest.mark.slow
SETTINGS = EngineSettings(max_model_len=1024, kv_cache_memory_bytes=64 << 20)
PROMPTS = [[1, 40, 41, 42], [1, 60, 61]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from rayuid.system.engine import VllmEngine

    engine = VllmEngine(tiny_model_dir, SETTINGS, enable_lora=True, seed=0)
    yield engine
    engine.close()


def _hf_scores(model, prompts, responses):
    batch = collate(prompts, responses, pad_id=0)
    with torch.no_grad():
        lp = response_logprobs(model, batch)
    return [lp[i, : len(r)].tolist() for i, r in enumerate(responses)]


def test_generate_logprobs_match_transformers(engine, tiny_model_dir):
    gens = engine.generate(PROMPTS, SamplingSettings(n=2, max_tokens=12), seed=5)
    assert [len(g) for g in gens] == [2, 2]
    model = load_causal_lm(tiny_model_dir)
    for prompt, samples in zip(PROMPTS, gens):
        for g in samples:
            assert len(g.token_ids) == len(g.logprobs) and g.version == 0
            ref = _hf_scores(model, [prompt], [g.token_ids])[0]
            assert max(abs(a - b) for a, b in zip(g.logprobs, ref)) < 1e-4


def test_score_matches_transformers_and_weight_load_changes_it(engine, tiny_model_dir):
    responses = [[50, 51, 52, 2], [70, 71]]
    model = load_causal_lm(tiny_model_dir)
    before = engine.score(PROMPTS, responses)
    for got, ref in zip(before, _hf_scores(model, PROMPTS, responses)):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blob = pack_state_dict(model.state_dict(), version=1)
    assert engine.load_weights(blob)[:2] == (1, blob.checksum)   # (version, checksum, seconds)
    after = engine.score(PROMPTS, responses)
    for got, ref, old in zip(after, _hf_scores(model, PROMPTS, responses), before):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
        assert max(abs(a - b) for a, b in zip(got, old)) > 1e-3
    assert engine.generate(PROMPTS, SamplingSettings(max_tokens=4))[0][0].version == 1
    original = load_causal_lm(tiny_model_dir)
    engine.load_weights(pack_state_dict(original.state_dict(), version=2))  # back to base for later tests


def test_lora_version_is_served_under_a_new_request(engine, tiny_model_dir):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(load_causal_lm(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    blob = pack_state_dict(get_peft_model_state_dict(model), version=3, kind="lora", lora_config=config)
    engine.load_weights(blob)
    responses = [[50, 51, 52, 2], [70, 71]]
    got = engine.score(PROMPTS, responses)
    for g, ref in zip(got, _hf_scores(model, PROMPTS, responses)):
        assert max(abs(a - b) for a, b in zip(g, ref)) < 1e-4
    first = engine.lora_request
    engine.load_weights(pack_state_dict(get_peft_model_state_dict(model), version=4, kind="lora", lora_config=config))
    assert engine.lora_request.lora_int_id != first.lora_int_id and engine.version == 4
    engine.llm.llm_engine.remove_lora(engine.lora_request.lora_int_id)
    engine.lora_request = None  # back to the base model for later tests


def test_each_user_is_served_their_own_newest_adapter(engine, tiny_model_dir, tiny_tokenizer):
    from rayuid.config import TrainConfig
    from rayuid.data.templates import ScoringPair
    from rayuid.personal.adapters import UserAdapters
    from rayuid.system.engine import UnknownUserError

    cfg = TrainConfig.model_validate({"model": {"name": tiny_model_dir, "lora": {"r": 4, "alpha": 8}},
                                      "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"}})
    learner = UserAdapters(cfg, total_steps=4)
    train = [ScoringPair(f"t{i}", p, p + [7, 8], r)  # the teacher prompt holds an extra "follow-up"
             for i, (p, r) in enumerate(zip(PROMPTS, [[50, 51, 52, 2], [70, 71]]))]
    probe = [ScoringPair(f"p{i}", p, p, r) for i, (p, r) in enumerate(zip(PROMPTS, [[44, 45, 46, 2], [80, 81]]))]
    for user in ("alice", "bob"):
        learner.train_step(user, train)
        assert engine.load_adapter(user, learner.export(user)) == (1, learner.export(user).checksum)
    users = ["alice", "bob", None, "zed"]  # None: the base model; zed has no adapter (served the base)
    prompts, responses = [p.student_prompt for p in probe] * 2, [p.response for p in probe] * 2
    served = engine.score(prompts, responses, users=users)
    for i, user in enumerate(users):
        ref = learner.response_logprobs(user if user != "zed" else None, [probe[i % 2]])[0]
        assert max(abs(a - b) for a, b in zip(served[i], ref)) < 1e-4
    bob_before = engine.generate(PROMPTS, SamplingSettings(n=1, temperature=0.0, max_tokens=6), users=["bob"] * 2)
    learner.train_step("alice", train)
    engine.load_adapter("alice", learner.export("alice"))          # alice v2: bob and the base are untouched
    again = engine.score(prompts, responses, users=users)
    assert again[1] == served[1] and again[2] == served[2] and again[3] == served[3]
    assert max(abs(a - b) for a, b in zip(again[0], served[0])) > 1e-3
    bob_after = engine.generate(PROMPTS, SamplingSettings(n=1, temperature=0.0, max_tokens=6), users=["bob"] * 2)
    assert [g[0].token_ids for g in bob_after] == [g[0].token_ids for g in bob_before]
    assert bob_after[0][0].version == 1 and engine.user_versions["alice"][0] == 2
    with pytest.raises(UnknownUserError, match="unknown_user=base"):
        engine.score(prompts[:1], responses[:1], users=["zed"], unknown_user="error")
    for _ in range(2):  # reloading the same version (a restarted engine being re-synced) keeps it servable
        engine.load_adapter("bob", learner.export("bob"))
    assert engine.score(prompts[1:2], responses[1:2], users=["bob"]) == served[1:2]


def test_chat_returns_text(engine):
    out = engine.chat([[{"role": "user", "content": "Hello"}]], max_tokens=5, temperature=0.0)
    assert len(out) == 1 and isinstance(out[0], str)


def test_llm_user_simulator_on_a_real_engine(engine):
    from rayuid.feedback.users import LLMUserSimulator, make_persona

    user = LLMUserSimulator(make_persona("concise"), engine.chat, max_tokens=8, temperature=0.0)
    followups = user.respond(["Tell me about Paris."], ["Paris is the capital of France."])
    assert len(followups) == 1 and isinstance(followups[0], str) and followups[0]
    assert user.calls == 1


def test_engine_that_cannot_start_says_what_to_change(tmp_path):
    from rayuid.system.engine import EngineStartError, VllmEngine

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineStartError, match="ray.vllm"):
        VllmEngine(str(tmp_path), SETTINGS)


def test_lora_scoring_failure_names_the_workaround(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("einsum(): subscript b has size 16 for operand 1 which does not broadcast")

    monkeypatch.setattr(engine, "lora_request", object())
    monkeypatch.setattr(engine.llm, "generate", broken)
    with pytest.raises(RuntimeError, match="ray.teacher_in=learner"):
        engine.score(PROMPTS, [[50, 2], [70, 2]])


def test_judge_skips_what_does_not_fit_and_counts_it(engine):
    from rayuid.system.actors.judge import JudgeWorker

    judge = JudgeWorker.__new__(JudgeWorker)  # the actor body around this module's engine (no second engine)
    judge.engine, judge.max_tokens, judge.limit, judge.judged, judge.too_long = engine, 4, 1020, 0, 0
    out = judge.judge("I want short answers.", ["Hi?", "Hello?"], ["Short.", "word " * 1200], ["Longer reply.", "ok"])
    assert len(out) == 2 and out[1] == "tie" and set(out) <= {"x", "y", "tie"}
    assert judge.stats() == {"judged": 4, "too_long": 2}


def test_tied_lm_head_follows_the_published_embedding(tmp_path, tiny_llama_dir):
    """A tied LM head must be published under its own name too: given the embedding alone, vLLM's layerwise reload
    ("ParallelLMHead: Failed to load weights") puts the old head back (measured 0.5 nats off). The name shares the
    embedding's slot of the buffer, so it costs no bytes."""
    from rayuid.sdpo.models import load_tokenizer
    from rayuid.system.engine import VllmEngine

    model = load_causal_lm(tiny_llama_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    load_tokenizer(tiny_llama_dir).save_pretrained(tmp_path / "tied")
    model = load_causal_lm(str(tmp_path / "tied"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = VllmEngine(str(tmp_path / "tied"), SETTINGS, seed=0)
    responses = [[50, 51, 52, 2], [70, 71]]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blob = pack_state_dict(model.state_dict(), version=1)
    untied = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert blob.num_bytes == pack_state_dict(untied, version=1).num_bytes   # one slot for both names
    engine.load_weights(blob)
    for got, ref in zip(engine.score(PROMPTS, responses), _hf_scores(model, PROMPTS, responses)):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4

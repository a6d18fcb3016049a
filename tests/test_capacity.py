"""Sizing every GPU role against its GPUs before anything starts (rayuid.system.capacity)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayuid.config import load_config
from rayuid.system import capacity

JOBS = Path(__file__).resolve().parents[1] / "jobs"
GPU_JOBS = [p for p in sorted(JOBS.glob("*.yaml")) if "num_gpus: 1" in p.read_text() or "num_gpus: 0.5" in p.read_text()]


@pytest.mark.parametrize("path", GPU_JOBS, ids=[p.name for p in GPU_JOBS])
def test_every_shipped_gpu_job_is_sized_and_fits(path):
    cfg = load_config(path)
    roles = {n.role.split(" (")[0] for n in capacity.needs(cfg)}
    assert {"policy engines", "learner"} <= roles                      # checked, not skipped
    if cfg.online is not None and cfg.online.user.kind == "llm":
        assert "LLM user" in roles
    if cfg.online is not None and cfg.online.judge is not None:
        assert "judge" in roles
    assert capacity.problems(cfg) == []


def _user_job(*overrides):
    return load_config(JOBS / "online_tldr_qwen3_4b.yaml", ["online.user.model=Qwen/Qwen3-32B",
                                                            "ray.user.gpu_memory_gib=44.7", *overrides])


def test_a_role_that_does_not_fit_is_named_with_the_fix():
    """A Qwen3-32B user (~61 GiB of bf16 weights) on one 48 GB L40S: named, with tensor parallelism as the fix."""
    (problem,) = capacity.problems(_user_job())
    assert problem.startswith("LLM user (ray.user_vllm): Qwen/Qwen3-32B needs 61.1 GiB of weights")
    assert "raise ray.user_vllm.tensor_parallel_size" in problem
    vllm = "ray.user_vllm={max_model_len: 1536, gpu_memory_utilization: 0.85, kv_cache_memory_bytes: null, " \
           "dtype: bfloat16, tensor_parallel_size: 2}"
    (short,) = capacity.problems(_user_job(vllm))
    assert "tensor_parallel_size=2 needs 2 GPUs per replica but the role reserves 1" in short
    assert capacity.problems(_user_job(vllm, "ray.user.num_gpus=2")) == []   # 30.5 + KV ≤ 0.85 × 44.7 GiB


def test_learner_memory_shrinks_with_ranks_and_lora():
    job = JOBS / "offline_wildfeedback_qwen3_8b.yaml"
    small = ["ray.learner.gpu_memory_gib=40"]
    one = load_config(job, [*small, "ray.learners=1"])
    assert capacity.problems(one)[0].startswith("learner (ray.learner): Qwen/Qwen3-8B needs 122.0 GiB")
    assert capacity.problems(load_config(job, [*small, "ray.learners=8"])) == []


def test_a_local_model_is_sized_from_its_config(tiny_model_dir):
    from rayuid.sdpo.models import load_causal_lm

    shape = capacity.shape_of(tiny_model_dir)
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    actual = sum(p.numel() for p in load_causal_lm(tiny_model_dir).parameters())
    assert shape.layers == config["num_hidden_layers"] and abs(shape.params - actual) / actual < 0.05
    assert capacity.shape_of("no-org/unknown-model") is None


def test_a_gpu_shared_by_learner_and_engine_takes_the_ipc_path():
    from rayuid.system import transport

    shared = load_config(JOBS / "smoke_gpu.yaml")
    assert transport.mode(shared) == "collective" and transport.shares_gpu(shared)
    assert transport.engine_backend("cuda", shared_gpu=True) == "rayuid_ipc"
    assert transport.engine_backend("cuda") == "rayuid_nccl" and transport.engine_backend("cpu") == "rayuid_gloo"
    own = load_config(JOBS / "online_tldr_qwen3_4b.yaml")
    assert transport.mode(own) == "collective" and not transport.shares_gpu(own)     # auto: GPUs on both sides
    assert transport.mode(load_config(JOBS / "smoke.yaml")) == "object_store"          # auto on CPU


def test_tensor_parallel_engines_take_the_object_store():
    from rayuid.system import transport

    job = JOBS / "online_tldr_qwen3_4b.yaml"
    assert transport.mode(load_config(job, ["ray.vllm.tensor_parallel_size=2", "ray.engine.num_gpus=2"])) == \
        "object_store"                                                        # auto picks what works
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        transport.mode(load_config(job, ["ray.vllm.tensor_parallel_size=2", "ray.weight_transfer=collective"]))


def test_an_llm_user_without_resources_of_its_own_is_sized_on_the_engines_gpus():
    """Given no resources (``ray.user: {num_cpus: 0}``) the LLM user runs in an engine-sized bundle: it is checked
    against the engines' GPU, not skipped."""
    from rayuid.system.actors.spawn import plan_bundles

    cfg = _user_job("ray.user={num_cpus: 0}")
    (user,) = [n for n in capacity.needs(cfg) if n.role.startswith("LLM user")]
    assert user.budget_gib == pytest.approx((cfg.ray.user_vllm or cfg.ray.vllm).gpu_memory_utilization
                                            * cfg.ray.engine.gpu_memory_gib)
    assert dict(plan_bundles(cfg, needs_user_engine=True))["user0"]["GPU"] == cfg.ray.engine.num_gpus
    assert any(p.startswith("LLM user (ray.user_vllm): Qwen/Qwen3-32B needs 61.1 GiB") for p in capacity.problems(cfg))


def test_a_learner_that_does_not_fit_beside_its_engine_on_one_gpu_is_named():
    """smoke_gpu.yaml: learner and engine share one GPU; vLLM's gpu_memory_utilization is of the whole GPU."""
    greedy = load_config(JOBS / "smoke_gpu.yaml", ["ray.vllm.gpu_memory_utilization=0.9"])
    (problem,) = capacity.problems(greedy)
    assert problem.startswith("learner and engine share a 22.5 GiB GPU: the engine takes 0.9 of it, which leaves")
    fix = float(problem.rsplit("to ", 1)[1])
    learner = next(n for n in capacity.needs(greedy) if n.role.startswith("learner"))
    assert 0 <= 0.95 - learner.weights_gib / 22.5 - fix < 0.01
    assert capacity.problems(load_config(JOBS / "smoke_gpu.yaml", [f"ray.vllm.gpu_memory_utilization={fix}"])) == []

"""Will every GPU role fit its GPUs? A check before anything starts (``rayuid.system.actors.spawn.build_system``).

Each role that asks for GPUs and says how much memory one of them has (``ray.<role>.gpu_memory_gib``) is sized:

- an engine (policy rollout/scoring engines, the LLM user, the judge: each with its own ``ray.*vllm`` settings):
  bf16/fp16 weights ÷ tensor_parallel_size must fit in gpu_memory_utilization × the GPU's memory with room left for
  the KV cache of at least one ``max_model_len`` sequence, and a replica needs as many GPUs as its TP degree;
- a learner rank: full fine-tuning holds ~16 bytes per parameter (bf16 weights and grads are gathered per layer;
  fp32 master, grads and AdamW moments are sharded) ÷ ranks, LoRA ~2 bytes per parameter (the frozen base), in
  its share of the GPU (a learner with num_gpus 0.5 shares it with an engine).

A role that does not fit is named with what to change. Pure (reads a model's ``config.json`` when it is a local
folder, else a table of the models the shipped jobs name); roles without ``gpu_memory_gib`` are not checked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rayuid.system.transport import shares_gpu

GIB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs of a model: its parameter count and the shape of its KV cache."""

    params: float
    layers: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


KNOWN = {  # the models the shipped GPU jobs name (Qwen3 model cards)
    "qwen/qwen3-0.6b": ModelShape(0.60e9, 28, 8, 128),
    "qwen/qwen3-4b": ModelShape(4.02e9, 36, 8, 128),
    "qwen/qwen3-8b": ModelShape(8.19e9, 36, 8, 128),
    "qwen/qwen3-14b": ModelShape(14.8e9, 40, 8, 128),
    "qwen/qwen3-32b": ModelShape(32.8e9, 64, 8, 128),
}


def shape_of(name: str) -> ModelShape | None:
    """From a local folder's ``config.json`` (decoder-only HF layout), else the table; None if unknown."""
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return KNOWN.get(name.lower())
    c = json.loads(config.read_text())
    hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv_heads, head_dim = c.get("num_key_value_heads", heads), c.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * c.get("intermediate_size", 4 * hidden)
    embed = c["vocab_size"] * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return ModelShape(float(layers * per_layer + embed), layers, kv_heads, head_dim)


@dataclass(frozen=True)
class Need:
    """One role's GPU demand per GPU, and the memory it may use there."""

    role: str
    model: str
    weights_gib: float
    kv_gib: float
    budget_gib: float
    gpus_needed: int
    gpus_given: float


def _engine_need(role: str, field: str, model: str, settings, resources) -> Need | None:
    shape = shape_of(model)
    if shape is None or not resources.gpu_memory_gib or resources.num_gpus <= 0:
        return None
    width = 4 if settings.dtype == "float32" else 2
    tp = settings.tensor_parallel_size
    util = settings.gpu_memory_utilization or 0.9
    return Need(f"{role} ({field})", model, shape.params * width / tp / GIB,
                settings.max_model_len * shape.kv_bytes_per_token(width) / tp / GIB,
                util * resources.gpu_memory_gib, tp, resources.num_gpus)


def user_resources(r):
    """The resources the LLM user simulator runs on: ``ray.user``, or the engines' (``ray.engine``) when the user
    was given none (``rayuid.system.actors.spawn.plan_bundles`` places it that way)."""
    given = r.user.num_cpus > 0 or r.user.num_gpus > 0 or any(v > 0 for v in r.user.resources.values())
    return r.user if given else r.engine


def needs(cfg) -> list[Need]:
    """Every GPU role of the job that can be sized."""
    r, out = cfg.ray, []
    out.append(_engine_need("policy engines", "ray.vllm", cfg.model.name, r.vllm, r.engine))
    online = cfg.online
    if online is not None and online.user.kind == "llm":
        out.append(_engine_need("LLM user", "ray.user_vllm", online.user.model or cfg.model.name,
                                r.user_vllm or r.vllm, user_resources(r)))
    if online is not None and online.judge is not None:
        judge = r.judge_vllm or r.vllm
        judge = judge.model_copy(update={"max_model_len": online.judge.max_model_len or judge.max_model_len})
        out.append(_engine_need("judge", "ray.judge_vllm", online.judge.model or cfg.model.name, judge, r.judge))
    shape = shape_of(cfg.model.name)
    if shape is not None and r.learner.gpu_memory_gib and r.learner.num_gpus > 0:
        per_param = 2.0 if cfg.model.lora is not None else 16.0 / r.learners
        out.append(Need("learner (ray.learner)", cfg.model.name, shape.params * per_param / GIB, 0.0,
                        0.9 * r.learner.gpu_memory_gib * min(r.learner.num_gpus, 1.0), 1, r.learner.num_gpus))
    return [n for n in out if n is not None]


def _shared_gpu_problem(cfg, found: list[Need]) -> str | None:
    """Learner and engine on one GPU (fractional num_gpus on both): vLLM takes gpu_memory_utilization of the whole
    GPU, so the learner must fit beside it (5% kept for the two CUDA contexts)."""
    r = cfg.ray
    learner = next((n for n in found if n.role.startswith("learner")), None)
    if learner is None or not shares_gpu(cfg) or not r.engine.gpu_memory_gib:
        return None
    util = r.vllm.gpu_memory_utilization or 0.9
    left = (0.95 - util) * r.engine.gpu_memory_gib
    if learner.weights_gib <= left:
        return None
    fits = math.floor((0.95 - learner.weights_gib / r.engine.gpu_memory_gib) * 100) / 100
    fix = f"lower ray.vllm.gpu_memory_utilization to {fits:.2f}" if fits > 0.05 else "give each its own GPU"
    return (f"learner and engine share a {r.engine.gpu_memory_gib:g} GiB GPU: the engine takes "
            f"{util:g} of it, which leaves {left:.1f} GiB for the learner's {learner.weights_gib:.1f} GiB; {fix}")


def problems(cfg) -> list[str]:
    """One line per role that does not fit, saying what to change; empty when everything fits."""
    found = needs(cfg)
    out = [p for p in [_shared_gpu_problem(cfg, found)] if p]
    for n in found:
        section = n.role.split("(")[-1].rstrip(")")
        if n.gpus_needed > 1 and n.gpus_needed > n.gpus_given:  # TP 1 may take a share of a GPU
            out.append(f"{n.role}: tensor_parallel_size={n.gpus_needed} needs {n.gpus_needed} GPUs per replica "
                       f"but the role reserves {n.gpus_given:g}; set its num_gpus to {n.gpus_needed}")
        elif n.weights_gib + n.kv_gib > n.budget_gib:
            fix = ("use LoRA (model.lora) or more learner ranks (ray.learners)" if n.role.startswith("learner")
                   else f"raise {section}.tensor_parallel_size (and the role's num_gpus), shorten max_model_len, "
                        "or use GPUs with more memory")
            kv = f" + {n.kv_gib:.1f} GiB of KV cache for one {section}.max_model_len sequence" if n.kv_gib else ""
            out.append(f"{n.role}: {n.model} needs {n.weights_gib:.1f} GiB of weights{kv} per GPU, but may use "
                       f"{n.budget_gib:.1f} GiB there; {fix}")
    return out

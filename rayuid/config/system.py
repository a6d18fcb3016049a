"""Where and how the Ray actors run: resources per role, vLLM engine settings, the ``ray:`` block."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayuid.config.method import StrictModel


class Resources(StrictModel):
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for each actor of this role in the job's placement group."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved for each actor of this role (fractions share a GPU); 0 = CPU only."""
    resources: dict[str, float] = {}
    """Custom Ray resources, e.g. {learner: 0.01} to pin a role to the node type that advertises `learner`."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU (GiB) on the node type this role lands on (e.g. 22.5 for an L4, 44.7 for an L40S, 79.6
    for an H100). Set: the role is sized before anything starts (rayuid.system.capacity); None: not checked."""
    threads: int | None = Field(None, ge=1)
    """torch/OpenMP threads inside the actor (default: its whole-CPU count, at least 1). On a small machine where
    the phases run one after another, letting each actor use every core is faster."""

    def num_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


class EngineSettings(StrictModel):
    """vLLM engine arguments of one role (ray.vllm: the policy's rollout and scoring engines; ray.user_vllm and
    ray.judge_vllm: the LLM user and the judge, default ray.vllm) — see vllm.LLM."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """auto = bfloat16 where the engine's node computes it natively, else float32 (decided by each engine; not
    vLLM's own 'auto', which follows the checkpoint's dtype whatever the hardware)."""
    max_model_len: int = Field(2048, ge=16)
    """Context length of each engine in tokens: must hold template.max_prompt_tokens + max_response_tokens."""
    kv_cache_memory_bytes: int | None = Field(256 << 20, ge=1 << 20)
    """CPU: KV cache size in bytes (vLLM otherwise reserves 92% of a NUMA node); on GPU set null and use
    gpu_memory_utilization."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine spreads its weights over (vLLM tensor parallelism); give the role that many num_gpus."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """Share of the GPU's memory vLLM may take (weights and KV cache); None = vLLM's default."""
    enforce_eager: bool = True
    """vLLM enforce_eager: no CUDA graphs (on a GPU: faster start and less memory, slower generation)."""
    max_lora_rank: int = Field(16, ge=1)
    """With model.lora: the largest adapter rank the engines accept (one of vLLM's ranks, >= model.lora.r)."""
    max_loras: int = Field(2, ge=1)
    """With model.lora: how many adapters vLLM serves in one batch (per-user runs: users generated together)."""
    extra: dict = {}
    """Any other vllm.LLM keyword arguments, passed through unchanged."""


class RaySettings(StrictModel):
    """Where and how the actors run. Present = the Ray system; absent = the single-process offline trainer."""

    address: str | None = None
    """None: join RAY_ADDRESS if set (as under `ray job submit`), else start a local single-node Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a locally started Ray (None = all)."""
    learners: int = Field(1, ge=1)
    """Learner actors: ranks of one FSDP policy, or (per-user runs) independent learners that split the users."""
    learner: Resources = Resources()
    """Resources (and threads) of each learner actor."""
    rollout_workers: int = Field(1, ge=1)
    """vLLM engines that generate replies (they also score when teacher_workers is 0)."""
    teacher_workers: int = Field(0, ge=0)
    """0 = the teacher scores on the rollout engines (one engine per worker, needed on 2 cores)."""
    engine: Resources = Resources()
    """Resources (and threads) of each vLLM rollout or teacher engine."""
    user: Resources = Resources(num_cpus=0.0)
    """The user simulator's resources. Nothing set: a rule user runs outside the placement group, an LLM user
    gets ray.engine's resources."""
    judge: Resources = Resources()
    """Resources of the LLM judge's engine (only started when online.judge is set)."""
    user_workers: int = Field(1, ge=1)
    """Replicas of the LLM user simulator, each its own engine on ray.user's resources; a step's follow-ups are
    split over them. A rule-based user is one actor (1)."""
    judge_workers: int = Field(1, ge=1)
    """Replicas of the LLM judge (online.judge), each its own engine on ray.judge's resources; an evaluation's
    judgements are split over them."""
    teacher_in: Literal["vllm", "learner"] = "vllm"
    """vllm = one batched prefill (prompt_logprobs) on the live policy; learner = a no-grad forward in the learner."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend of the learners; auto = nccl when CUDA is visible, else gloo."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = "PACK"
    """Ray placement-group strategy for all of the job's bundles (PACK: few nodes, SPREAD: many, STRICT_PACK: one)."""
    user_vllm: EngineSettings | None = None
    """Engine settings of the LLM user simulator (its model: online.user.model); None = ray.vllm."""
    judge_vllm: EngineSettings | None = None
    """Engine settings of the judge (its model: online.judge.model); None = ray.vllm."""
    weight_transfer: Literal["auto", "object_store", "collective"] = "auto"
    """How a new policy reaches the engines. object_store: one flat buffer per version through Ray's object store
    (engines read it zero-copy on their node). collective: vLLM's weight-transfer API, the learner broadcasting to
    every engine over NCCL (GPU) or gloo (CPU). auto: collective when the learner and the engines have GPUs, else
    object_store. LoRA adapters always take the object store (they are small)."""
    transfer_bucket_bytes: int = Field(256 << 20, ge=1 << 16)
    """collective: bytes per broadcast (a bucket of the packed weights)."""
    sync_timeout_s: float = Field(300.0, gt=0)
    """Seconds the weight sync waits for each engine, and the learners for their process group, before an error."""
    call_timeout_s: float = Field(900.0, gt=0)
    """Seconds any call to an actor may take (also reserving resources and starting actors) before it is an error."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a dead engine, user simulator or judge (the call is retried on it), and times the driver
    replaces dead learners and resumes from the last checkpoint."""
    vllm: EngineSettings = EngineSettings()
    """vLLM settings shared by the rollout, teacher, LLM-user and judge engines."""

"""Job configuration: pydantic models loaded from YAML in ``jobs/`` plus ``key=value`` overrides.

Every model forbids unknown keys, so a typo is an error that names the key, never a silently ignored setting.
Values are validated, never rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayuid.data.extract import ExtractConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelSettings(_Strict):
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """HF hub name or local folder; SmolLM2-135M-Instruct works offline (see rayuid.models)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Dtype of the stored (master) weights. auto = bfloat16 on a GPU with native bf16, float32 on CPU (decided on
    the learner's node; see rayuid.precision)."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """bfloat16 = autocast matmuls (master weights and log-softmax stay as they are). auto = bfloat16 where the
    learner's device computes it natively (CUDA with bf16, CPUs with AVX512_BF16/AMX), else float32. bf16 on a CPU
    without it is emulated and ~20-40x slower: honoured, with a warning."""
    lora: LoraSettings | None = None
    """None = full fine-tuning (the paper's setting); a block = PEFT LoRA adapter."""


class DataSettings(_Strict):
    paths: list[str] = ["rayuid:sample"]
    """Chat logs or extracted interactions (.jsonl/.json/.parquet/HF dataset); 'rayuid:sample' = the shipped sample."""
    extract: ExtractConfig = ExtractConfig()
    max_interactions: int | None = Field(None, ge=1)


class TemplateSettings(_Strict):
    hindsight: str = "paper"
    """'paper' (Table 1), 'offline' (the offline code's 'insufficient attempt' text) or a string with {followup}."""
    max_prompt_tokens: int = Field(2048, ge=8)
    max_response_tokens: int = Field(2048, ge=2)
    append_eos: bool = True


class LossSettings(_Strict):
    kind: Literal["sampled_token", "reverse_kl", "forward_kl", "jsd"] = "sampled_token"
    ignore_first_k: int = Field(2, ge=0)
    center: bool = False
    adv_clip: float | None = Field(None, gt=0)
    ratio_clip: float | None = Field(None, gt=0, lt=1)
    alpha: float = Field(0.5, ge=0, le=1)
    topk: int | None = Field(None, ge=1)
    add_tail: bool = True
    chunk_size: int = Field(1024, ge=1)


class TeacherSettings(_Strict):
    weights: Literal["live", "ema", "frozen"] = "live"
    """live = current policy (paper); ema = θ_T ← (1−τ)θ_T + τθ after each step; frozen = the initial model."""
    ema_rate: float = Field(0.05, gt=0, le=1)


class OptimSettings(_Strict):
    lr: float = Field(2e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(10.0, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(8, ge=1)
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)


class CheckpointSettings(_Strict):
    every_steps: int | None = Field(None, ge=1)
    """Save every N optimizer steps (and always at the end); None = only at the end."""
    keep_last: int = Field(2, ge=1)
    resume: bool = True
    """Continue from the newest checkpoint in run_dir/checkpoints if there is one."""
    save_final: bool = True


class Resources(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = {}
    """Custom Ray resources, e.g. {learner: 0.01} to pin a role to the node type that advertises `learner`."""
    threads: int | None = Field(None, ge=1)
    """torch/OpenMP threads inside the actor (default: its whole-CPU count, at least 1). On a small machine where
    the phases run one after another, letting each actor use every core is faster."""

    def num_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


class EngineSettings(_Strict):
    """vLLM engine arguments shared by rollout, teacher and LLM-user engines (see vllm.LLM)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """auto = bfloat16 where the engine's node computes it natively, else float32 (decided by each engine; not
    vLLM's own 'auto', which follows the checkpoint's dtype whatever the hardware)."""
    max_model_len: int = Field(2048, ge=16)
    kv_cache_memory_bytes: int | None = Field(256 << 20, ge=1 << 20)
    """CPU: KV cache size (vLLM otherwise reserves 92% of a NUMA node). Set null and use gpu_memory_utilization on GPU."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool = True
    max_lora_rank: int = Field(16, ge=1)
    max_loras: int = Field(2, ge=1)
    extra: dict = {}
    """Any other vllm.LLM keyword arguments, passed through unchanged."""


class RaySettings(_Strict):
    """Where and how the actors run. Present = the Ray system; absent = the single-process offline trainer."""

    address: str | None = None
    """None: join RAY_ADDRESS if set (as under `ray job submit`), else start a local single-node Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a locally started Ray (None = all)."""
    learners: int = Field(1, ge=1)
    learner: Resources = Resources()
    rollout_workers: int = Field(1, ge=1)
    teacher_workers: int = Field(0, ge=0)
    """0 = the teacher scores on the rollout engines (one engine per worker, needed on 2 cores)."""
    engine: Resources = Resources()
    user: Resources = Resources(num_cpus=0.0)
    judge: Resources = Resources()
    """The LLM judge's engine (only started when online.judge is set)."""
    teacher_in: Literal["vllm", "learner"] = "vllm"
    """vllm = one batched prefill (prompt_logprobs) on the live policy; learner = a no-grad forward in the learner."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = "PACK"
    sync_timeout_s: float = Field(300.0, gt=0)
    call_timeout_s: float = Field(900.0, gt=0)
    max_restarts: int = Field(3, ge=0)
    vllm: EngineSettings = EngineSettings()


class SamplingSettings(_Strict):
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)


class UserSettings(_Strict):
    kind: Literal["rule", "llm"] = "rule"
    persona: str = "concise"
    """A persona name from rayuid.users.PERSONAS."""
    params: dict[str, float] = {}
    """Persona parameters, e.g. {max_words: 30} for concise."""
    model: str | None = None
    """LLM simulator model (default: the policy's base model)."""
    max_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)


class JudgeSettings(_Strict):
    """Pairwise LLM judge of held-out replies (per-user runs): the persona is its system prompt; A/B/tie, both orders."""

    model: str | None = None
    """Judge model (default: the policy's base model); the paper used Qwen3-8B for a Qwen3-4B policy."""
    max_tokens: int = Field(8, ge=1)
    max_model_len: int | None = Field(None, ge=64)
    """The judge sees a request and two replies: give it a longer context than ray.vllm.max_model_len if needed."""


USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""User ids name PEFT adapters, adapter folders and vLLM LoRA names (``rayuid.adapters.check_user_id``)."""


class UserSpec(_Strict):
    """One simulated user of a per-user personalization run: an id and the persona(s) it plays, in order."""

    id: str = Field(pattern=USER_ID_PATTERN)
    personas: list[str] = Field(min_length=1)
    """More than one: the user changes preference every ``online.switch_every`` steps (flip / sequential runs)."""
    params: dict[str, dict[str, float]] = {}
    """Per persona, e.g. {concise: {max_words: 30}}."""

    @model_validator(mode="after")
    def _check_params(self) -> "UserSpec":
        if unknown := sorted(set(self.params) - set(self.personas)):
            raise ValueError(f"user {self.id}: params for {unknown}, which are not among its personas {self.personas}")
        from rayuid.users import make_persona

        for persona in self.personas:
            if persona.startswith("prefeval:"):  # read when the run starts (the data may live on the cluster only)
                if "/" not in persona or self.persona_params(persona):
                    raise ValueError(f"user {self.id}: write PrefEval personas as prefeval:<topic>/<i>, no params")
                continue
            make_persona(persona, **self.persona_params(persona))  # unknown persona or parameter: says which exist
        return self

    def persona_params(self, persona: str) -> dict[str, float]:
        return dict(self.params.get(persona, {}))


class OnlineSettings(_Strict):
    """Online SDPO (paper Algorithm 1): sample → simulated user → score → learn → publish."""

    prompts: list[str] = ["rayuid:prompts"]
    """Prompt sources: interaction/chat files (their contexts are used) or 'rayuid:prompts' (shipped prompts)."""
    prompt_field: str = "prompt"
    """For records that hold a plain-text prompt: its (dotted) field, e.g. `prompt` (HelpSteer2), `info.post` (TL;DR)."""
    max_prompt_chars: int = Field(4096, ge=1)
    heldout_prompts: int = Field(0, ge=0)
    """The last N prompts are kept out of training and used for the held-out evaluation."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate on the held-out prompts (greedy) before training, every N steps and at the end."""
    system_prompt: str | None = None
    prompts_per_step: int = Field(8, ge=1)
    steps: int = Field(10, ge=1)
    max_staleness: int = Field(0, ge=0)
    sampling: SamplingSettings = SamplingSettings()
    user: UserSettings = UserSettings()
    users: list[UserSpec] = []
    """Non-empty: per-user personalization. Each user gets its own LoRA adapter, trained only on its interactions;
    ``prompts_per_step`` is then per user, and ``user`` gives the simulator kind and settings shared by all."""
    switch_every: int | None = Field(None, ge=1)
    unknown_user: Literal["base", "error"] = "base"
    """What the engines serve a user without an adapter: the base model, or an error."""
    oracle: bool = True
    """Also evaluate the in-context oracle: the base model with the persona in its system prompt."""
    judge: JudgeSettings | None = None

    @model_validator(mode="after")
    def _check_users(self) -> "OnlineSettings":
        ids = [u.id for u in self.users]
        if len(set(ids)) != len(ids):
            raise ValueError(f"online.users ids must be unique, got {ids}")
        if any(len(u.personas) > 1 for u in self.users) and self.switch_every is None:
            raise ValueError("a user with several personas needs online.switch_every (steps per persona)")
        if self.users and self.switch_every and self.eval_every and self.switch_every % self.eval_every:
            raise ValueError(f"online.switch_every={self.switch_every} must be a multiple of online.eval_every="
                             f"{self.eval_every}, so that every preference switch is an evaluation point")
        self._check_reachable()
        return self

    def _check_reachable(self) -> None:
        """A length persona the sampled replies cannot satisfy teaches nothing (~0.75 words per token)."""
        from rayuid.users import make_persona

        specs = [(u.id, p, u.persona_params(p)) for u in self.users for p in u.personas if not p.startswith("prefeval:")]
        specs.append(("online.user", self.user.persona, dict(self.user.params)))
        for who, persona, params in specs:
            rule = make_persona(persona, **params).rule
            need = rule.keywords.get("min_words", 0) if rule is not None else 0
            if need > 0.75 * self.sampling.max_tokens:
                raise ValueError(f"{who}: persona {persona} wants >= {need:g} words, but online.sampling.max_tokens="
                                 f"{self.sampling.max_tokens} allows about {0.75 * self.sampling.max_tokens:.0f}; "
                                 "raise max_tokens (and template.max_response_tokens) or lower min_words")


class TrainConfig(_Strict):
    run_dir: str = "runs/offline"
    seed: int = 42
    threads: int | None = Field(None, ge=1)
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    template: TemplateSettings = TemplateSettings()
    loss: LossSettings = LossSettings()
    teacher: TeacherSettings = TeacherSettings()
    optim: OptimSettings = OptimSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    ray: RaySettings | None = None
    online: OnlineSettings | None = None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.loss.ratio_clip is not None and self.loss.kind != "sampled_token":
            raise ValueError("loss.ratio_clip applies to loss.kind=sampled_token only; remove it or change the kind")
        if self.online is not None and self.ray is None:
            raise ValueError("online training runs on the Ray system: add a `ray:` block (it may be empty: `ray: {}`)")
        if self.ray is not None:
            need = self.template.max_prompt_tokens + self.template.max_response_tokens
            if need > self.ray.vllm.max_model_len:
                raise ValueError(f"ray.vllm.max_model_len={self.ray.vllm.max_model_len} cannot hold a prompt of "
                                 f"template.max_prompt_tokens + a reply of template.max_response_tokens ({need}); "
                                 "raise max_model_len or lower the template limits")
        if self.online is not None and self.online.eval_every and not self.online.heldout_prompts:
            raise ValueError("online.eval_every needs online.heldout_prompts > 0 (the prompts to evaluate on)")
        if self.online is not None and self.online.sampling.max_tokens > self.template.max_response_tokens:
            raise ValueError("online.sampling.max_tokens exceeds template.max_response_tokens; lower the first or "
                             "raise the second")
        if self.ray is not None and self.model.lora is not None:
            ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRAConfig accepts
            if self.ray.vllm.max_lora_rank not in ranks or self.model.lora.r > self.ray.vllm.max_lora_rank:
                raise ValueError(f"ray.vllm.max_lora_rank={self.ray.vllm.max_lora_rank} must be one of {ranks} and "
                                 f">= model.lora.r={self.model.lora.r}")
        if self.online is not None and self.online.users:
            if self.model.lora is None:
                raise ValueError("online.users trains one LoRA adapter per user: set model.lora (e.g. {r: 16})")
            if self.ray.teacher_in != "learner":
                raise ValueError("online.users scores the hindsight teacher with each user's adapter in the learner: "
                                 "set ray.teacher_in=learner")
        if self.ray is not None and self.ray.teacher_in == "vllm":
            if self.teacher.weights != "live":
                raise ValueError(f"teacher.weights={self.teacher.weights} needs ray.teacher_in=learner: the vLLM "
                                 "engines serve the live policy only")
            if self.loss.kind != "sampled_token":
                raise ValueError(f"loss.kind={self.loss.kind} needs full teacher distributions; set "
                                 "ray.teacher_in=learner (vLLM scoring returns sampled-token log-probs)")
        return self


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the reason and the fix."""


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-5", "model.lora.r=8"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. optim.lr=1e-5")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below a scalar; check the key path")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: list[str] = (), model: type[BaseModel] = TrainConfig) -> BaseModel:
    """Read YAML, apply overrides, validate; errors list every bad key with its location."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are in jobs/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level, got {type(raw).__name__}")
    merged = _merge(raw, parse_overrides(list(overrides)))
    try:
        return model.model_validate(merged)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid config {path}:\n" + "\n".join(lines)) from None


def dump_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

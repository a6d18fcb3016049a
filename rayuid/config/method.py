"""What the method needs: the model, the data, the hindsight template, the loss, the teacher, the optimizer,
checkpoints (and the extraction filters of logged chats)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExtractConfig(BaseModel):
    """Extraction filters and limits. The defaults are the paper's WildChat settings, minus the language filter."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_messages: int = Field(3, ge=0)
    """A conversation needs at least this many user/assistant messages after normalisation."""
    max_conversation_chars: int = Field(100_000, ge=0)
    """A conversation whose messages total more characters than this is dropped."""
    max_assistant_chars: int | None = Field(4096, ge=0)
    """A conversation with any longer assistant message is dropped. None disables the check."""
    max_user_chars: int | None = Field(4096, ge=0)
    """A conversation with any longer user message is dropped. None disables the check, as for WildFeedback."""
    languages: list[str] | None = None
    """Keep only records whose `language` is in this list (case-insensitive), e.g. ["English", "en"]; None = all."""
    max_context_messages: int = Field(5, ge=1)
    """The context x keeps at most the last N user/assistant messages (a leading system message comes on top)."""
    max_line_bytes: int = Field(10_000_000, ge=1)
    """A .jsonl line larger than this is rejected as line_too_large and never held in memory whole."""
    max_conversations: int | None = Field(None, ge=1)
    """Stop after reading this many records across all inputs; None reads them all."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1)
    """LoRA rank: the inner dimension of each adapter's low-rank update (PEFT `r`)."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling (PEFT `lora_alpha`): the update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on the adapter's input (PEFT `lora_dropout`); 0 = none."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Linear layers that get an adapter (PEFT `target_modules`): by default all attention and MLP projections."""


class ModelSettings(StrictModel):
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """HF hub name or local folder; SmolLM2-135M-Instruct works offline (see rayuid.sdpo.models)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Dtype of the stored (master) weights. auto = bfloat16 on a GPU with native bf16, float32 on CPU (decided on
    the learner's node; see rayuid.precision)."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """bfloat16 = autocast matmuls (master weights and log-softmax stay as they are). auto = bfloat16 where the
    learner's device computes it natively (CUDA with bf16, CPUs with AVX512_BF16/AMX), else float32. bf16 on a CPU
    without it is emulated and ~20-40x slower: honoured, with a warning."""
    lora: LoraSettings | None = None
    """None = full fine-tuning (the paper's setting); a block = PEFT LoRA adapter."""


class DataSource(StrictModel):
    """A dataset as ``datasets.load_dataset`` names it (a hub id or a local folder). In YAML a mapping, or the
    string ``NAME``, ``NAME:SPLIT`` or ``NAME:CONFIG:SPLIT``."""

    name: str
    """Hub id (``org/name``) or local dataset folder."""
    config: str | None = None
    """The dataset's config (subset) name, required where it has several (e.g. `comparisons` of TL;DR)."""
    split: str = "train"
    """The split to read."""
    revision: str | None = None
    """A branch, tag or commit of a hub dataset, e.g. `refs/convert/parquet` (the hub's parquet conversion of a
    script dataset, which datasets 5.x no longer runs)."""


class DataSettings(StrictModel):
    paths: list[str | DataSource] = ["rayuid:sample"]
    """Chat logs or extracted interactions (.jsonl/.json/.parquet, a dataset folder or hub dataset: a string or a
    {name, config, split, revision} mapping); 'rayuid:sample' = the shipped sample."""
    extract: ExtractConfig = ExtractConfig()
    """Filters and limits for turning the chat logs into interactions (see `rayuid extract`)."""
    max_interactions: int | None = Field(None, ge=1)
    """Train on only the first N extracted interactions; None = all of them."""


class TemplateSettings(StrictModel):
    hindsight: str = "paper"
    """'paper' (Table 1), 'offline' (the offline code's 'insufficient attempt' text) or a string with {followup}."""
    max_prompt_tokens: int = Field(2048, ge=8)
    """Student and teacher prompts (and rollout prompts) keep only their last N tokens after the chat template."""
    max_response_tokens: int = Field(2048, ge=2)
    """Logged replies are cut to N tokens (EOS included). Online, sampling.max_tokens must not exceed it, and the
    two template limits together must fit in ray.vllm.max_model_len."""
    append_eos: bool = True
    """Append EOS to each logged reply (within max_response_tokens) so that the end of turn gets a signal too;
    sampled replies are used as generated."""


class LossSettings(StrictModel):
    kind: Literal["sampled_token", "reverse_kl", "forward_kl", "jsd"] = "sampled_token"
    """sampled_token = the paper's per-token advantage (teacher − student log-prob) on the reply's own tokens; the
    others are divergences of the full (or top-k) next-token distributions, and on Ray need ray.teacher_in=learner."""
    ignore_first_k: int = Field(2, ge=0)
    """The first k tokens of every reply get no signal and no loss (their hindsight ratio is mostly template
    noise); 0 uses every token."""
    center: bool = False
    """sampled_token: subtract each reply's mean advantage from its tokens' advantages (a per-sequence baseline)."""
    adv_clip: float | None = Field(None, gt=0)
    """sampled_token: clamp each advantage (after center) to [-c, c]; None = no clamp."""
    ratio_clip: float | None = Field(None, gt=0, lt=1)
    """sampled_token: PPO clip epsilon on the ratio to behaviour log-probs. No trainer passes those yet, so a
    value fails at the first step; keep None."""
    alpha: float = Field(0.5, ge=0, le=1)
    """jsd only: the teacher's weight α in M = (1−α)·student + α·teacher; α = 0 or 1 gives a zero loss."""
    topk: int | None = Field(None, ge=1)
    """Divergence kinds: compare only on the student's top-k token ids per position; None = the whole vocabulary."""
    add_tail: bool = True
    """With topk: add one bucket for the probability mass outside the top k; false renormalises over the top k."""
    chunk_size: int = Field(1024, ge=1)
    """Token positions per chunk when computing log-probs and divergences: caps the extra memory at about
    chunk_size × vocabulary floats; the result does not change."""


class TeacherSettings(StrictModel):
    weights: Literal["live", "ema", "frozen"] = "live"
    """live = current policy (paper); ema = θ_T ← (1−τ)θ_T + τθ after each step; frozen = the initial model."""
    ema_rate: float = Field(0.05, gt=0, le=1)
    """τ of the EMA teacher (weights=ema only): the share of the live weights mixed in after each step."""


class OptimSettings(StrictModel):
    lr: float = Field(2e-6, gt=0)
    """Peak AdamW learning rate, reached after the warmup."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW (decoupled) weight decay; 0 = none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2): decay rates of the gradient's running mean and running square."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning rate after the linear warmup: cosine decay to 0 at the last step, or constant."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the run's optimizer steps (rounded up) over which the learning rate rises linearly from 0."""
    max_grad_norm: float | None = Field(10.0, gt=0)
    """Clip the total gradient norm to this before each step; None = no clipping (the norm is still logged)."""
    micro_batch_size: int = Field(4, ge=1)
    """Interactions per forward/backward pass; an optimizer step accumulates the gradients of several."""
    grad_accum_steps: int = Field(8, ge=1)
    """Offline: micro-batches per optimizer step, so a step trains micro_batch_size × grad_accum_steps
    (× ray.learners) interactions. Online steps train what they sampled."""
    epochs: int = Field(2, ge=1)
    """Offline: passes over the interactions, each in a new seeded order."""
    max_steps: int | None = Field(None, ge=1)
    """Offline: stop after this many optimizer steps even if the epochs are not done; None = no cap."""


class CheckpointSettings(StrictModel):
    every_steps: int | None = Field(None, ge=1)
    """Save every N optimizer steps (and at the end: always on Ray, if save_final offline); None = only at the end."""
    keep_last: int = Field(2, ge=1)
    """Keep only the newest N complete checkpoints in run_dir/checkpoints (and per-user adapter versions)."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir/checkpoints if there is one."""
    save_final: bool = True
    """Offline trainer: also save after the last step; the Ray driver always does."""

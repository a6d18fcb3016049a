"""Online runs: sampling, the simulated user(s) and their personas, the judge, the ``online:`` block."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayuid.config.method import DataSource, StrictModel


class SamplingSettings(StrictModel):
    n: int = Field(1, ge=1)
    """Replies sampled per prompt; each becomes one interaction."""
    temperature: float = Field(1.0, ge=0)
    """vLLM sampling temperature; 0 = greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: draw from the smallest token set holding this probability mass; 1 = no cut."""
    max_tokens: int = Field(256, ge=1)
    """Longest reply in tokens, for training samples and greedy held-out replies alike."""


class UserSettings(StrictModel):
    kind: Literal["rule", "llm"] = "rule"
    """rule = the persona's deterministic follow-up rule; llm = a user model on its own vLLM engine plays it."""
    persona: str = "concise"
    """A persona name from rayuid.feedback.users.PERSONAS."""
    params: dict[str, float] = {}
    """Persona parameters, e.g. {max_words: 30} for concise."""
    model: str | None = None
    """LLM simulator model (default: the policy's base model)."""
    max_tokens: int = Field(96, ge=1)
    """kind=llm: the longest follow-up in tokens the user model may write."""
    temperature: float = Field(0.0, ge=0)
    """kind=llm: the user model's sampling temperature; 0 = greedy."""


class JudgeSettings(StrictModel):
    """Pairwise judge of held-out replies (per-user runs): the persona is its system prompt; A/B/tie, both orders."""

    model: str | None = None
    """Judge model (default: the policy's base model); the paper used Qwen3-8B for a Qwen3-4B policy."""
    max_tokens: int = Field(8, ge=1)
    """Tokens the judge may generate for its verdict (A, B or tie)."""
    max_model_len: int | None = Field(None, ge=64)
    """The judge sees a request and two replies: give it a longer context than ray.vllm.max_model_len if needed."""


USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""User ids name PEFT adapters, adapter folders and vLLM LoRA names (``rayuid.personal.adapters.check_user_id``)."""


class UserSpec(StrictModel):
    """One simulated user of a per-user personalization run: an id and the persona(s) it plays, in order."""

    id: str = Field(pattern=USER_ID_PATTERN)
    """The user's id, which names its LoRA adapter: 1-64 letters, digits, '_' or '-'."""
    personas: list[str] = Field(min_length=1)
    """Persona names (or prefeval:<topic>/<i>) the user plays. More than one: the user changes preference every
    ``online.switch_every`` steps (flip / sequential runs)."""
    params: dict[str, dict[str, float]] = {}
    """Per persona, e.g. {concise: {max_words: 30}}."""

    @model_validator(mode="after")
    def _check_params(self) -> "UserSpec":
        if unknown := sorted(set(self.params) - set(self.personas)):
            raise ValueError(f"user {self.id}: params for {unknown}, which are not among its personas {self.personas}")
        from rayuid.feedback.users import make_persona

        for persona in self.personas:
            if persona.startswith("prefeval:"):  # read when the run starts (the data may live on the cluster only)
                if "/" not in persona or self.persona_params(persona):
                    raise ValueError(f"user {self.id}: write PrefEval personas as prefeval:<topic>/<i>, no params")
                continue
            make_persona(persona, **self.persona_params(persona))  # unknown persona or parameter: says which exist
        return self

    def persona_params(self, persona: str) -> dict[str, float]:
        return dict(self.params.get(persona, {}))


class OnlineSettings(StrictModel):
    """Online SDPO (paper Algorithm 1): sample → simulated user → score → learn → publish."""

    prompts: list[str | DataSource] = ["rayuid:prompts"]
    """Prompt sources: interaction/chat files (their contexts are used) or 'rayuid:prompts' (shipped prompts)."""
    prompt_field: str = "prompt"
    """For records holding a plain-text prompt: its (dotted) field, e.g. `prompt` (HelpSteer2), `info.post` (TL;DR)."""
    max_prompt_chars: int = Field(4096, ge=1)
    """Plain-text prompts (from prompt_field) longer than this many characters are skipped."""
    heldout_prompts: int = Field(0, ge=0)
    """The last N prompts are kept out of training and used for the held-out evaluation."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate on the held-out prompts (greedy) before training, every N steps and at the end. None: no evaluation
    in single-policy runs; per-user runs still evaluate at the start and the end."""
    system_prompt: str | None = None
    """If set, the system message of every prompt (replacing any it had); None keeps the prompts as they are."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts drawn per step (seeded), each sampled sampling.n times; per user in per-user runs."""
    steps: int = Field(10, ge=1)
    """Online steps; each one samples, simulates the user, scores and makes one optimizer step."""
    max_staleness: int = Field(0, ge=0, le=1)
    """0 = strictly on-policy: step t+1 samples only after the engines serve step t's weights. 1 = step t+1's
    replies are generated while step t learns (one version behind). Deeper pipelines are not implemented."""
    sampling: SamplingSettings = SamplingSettings()
    """How the policy's replies are sampled."""
    user: UserSettings = UserSettings()
    """The simulated user who writes the follow-ups (in per-user runs only its kind and generation settings)."""
    users: list[UserSpec] = []
    """Non-empty: per-user personalization. Each user gets its own LoRA adapter, trained only on its interactions;
    ``prompts_per_step`` is then per user, and ``user`` gives the simulator kind and settings shared by all."""
    switch_every: int | None = Field(None, ge=1)
    """Steps per persona for users with several personas (needed then); the last persona lasts to the end."""
    unknown_user: Literal["base", "error"] = "base"
    """What the engines serve a user without an adapter: the base model, or an error."""
    oracle: bool = True
    """Per-user runs: also evaluate the in-context oracle, the base model with the persona in its system prompt
    (single-policy runs always do when they start from the base model)."""
    judge: JudgeSettings | None = None
    """LLM judge of held-out replies in per-user runs; None = only personas with a programmatic check get win rates."""

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
        from rayuid.feedback.users import make_persona

        specs = [(u.id, p, u.persona_params(p)) for u in self.users for p in u.personas
                 if not p.startswith("prefeval:")]
        specs.append(("online.user", self.user.persona, dict(self.user.params)))
        for who, persona, params in specs:
            rule = make_persona(persona, **params).rule
            need = rule.keywords.get("min_words", 0) if rule is not None else 0
            if need > 0.75 * self.sampling.max_tokens:
                raise ValueError(f"{who}: persona {persona} wants >= {need:g} words, but online.sampling.max_tokens="
                                 f"{self.sampling.max_tokens} allows about {0.75 * self.sampling.max_tokens:.0f}; "
                                 "raise max_tokens (and template.max_response_tokens) or lower min_words")

"""Student and hindsight-teacher contexts (paper §3).

The teacher is the same model with the user's follow-up o appended *inside the last user turn*. Both contexts are
rendered with the tokenizer's own chat template (thinking disabled where the template supports it), tokenised
separately, and the response is tokenised once and appended after both, so student and teacher score exactly the
same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

PAPER_TEMPLATE = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[The following is a future user message. Use this to guide your answer to the user prompt.]\n"
    "{followup}"
)
OFFLINE_TEMPLATE = (
    "\n\n[HINDSIGHT CONTEXT]\n"
    "The following is a user response to your previous, insufficient attempt. "
    "Improve your response to the user prompt.\n"
    "Future User Message: {followup}"
)
NAMED_TEMPLATES = {"paper": PAPER_TEMPLATE, "offline": OFFLINE_TEMPLATE}


def hindsight_block(template: str) -> str:
    """A named template ('paper', 'offline') or a user string that contains ``{followup}``."""
    block = NAMED_TEMPLATES.get(template, template)
    if "{followup}" not in block:
        raise ValueError(
            f"hindsight template {template!r} is neither a known name {sorted(NAMED_TEMPLATES)} nor a string "
            "containing '{followup}'. Use one of the names, or write your own text with a '{followup}' placeholder."
        )
    return block


def hindsight_messages(context: Sequence[dict], followup: str, template: str = "paper") -> list[dict]:
    """Copy of ``context`` whose last (user) message has the hindsight block appended."""
    if not context or context[-1].get("role") != "user":
        raise ValueError("a hindsight context needs a history that ends with a user message")
    block = hindsight_block(template).replace("{followup}", followup.strip())
    last = dict(context[-1], content=str(context[-1]["content"]) + block)
    return [dict(m) for m in context[:-1]] + [last]


def render_prompt_ids(tokenizer, messages: Sequence[dict], max_prompt_tokens: int | None = None) -> list[int]:
    """Chat-template ``messages`` with the generation prompt; keep the *last* ``max_prompt_tokens`` ids."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


def response_token_ids(tokenizer, text: str, append_eos: bool = True, max_tokens: int | None = None) -> list[int]:
    """Tokenise a logged reply once (right-stripped); EOS appended so the end of turn also gets a signal."""
    ids = tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max_tokens - 1 if append_eos else max_tokens]
    if append_eos:
        ids = ids + [tokenizer.eos_token_id]
    return ids


@dataclass(frozen=True)
class ScoringPair:
    """One interaction as token ids: ``student_prompt ⊕ response`` and ``teacher_prompt ⊕ response``."""

    id: str
    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]


@dataclass(frozen=True)
class TemplateOptions:
    hindsight: str = "paper"
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 2048
    append_eos: bool = True


def build_pair(tokenizer, interaction, options: TemplateOptions = TemplateOptions(),
               response_ids: list[int] | None = None) -> ScoringPair:
    """Both contexts of an interaction (``rayuid.data.Interaction``) as ids.

    ``response_ids``: already-sampled ids (online); otherwise the logged ``interaction.response`` is tokenised.
    """
    student = render_prompt_ids(tokenizer, interaction.context, options.max_prompt_tokens)
    teacher_msgs = hindsight_messages(interaction.context, interaction.followup, options.hindsight)
    teacher = render_prompt_ids(tokenizer, teacher_msgs, options.max_prompt_tokens)
    if response_ids is None:
        response_ids = response_token_ids(
            tokenizer, interaction.response, options.append_eos, options.max_response_tokens
        )
    return ScoringPair(interaction.id, student, teacher, list(response_ids))

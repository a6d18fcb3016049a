"""Hindsight contexts: where o goes, identical response ids, truncation, EOS, thinking off."""

from __future__ import annotations

import pytest

from rayuid.data.extract import Interaction
from rayuid.data.templates import (
    OFFLINE_TEMPLATE,
    PAPER_TEMPLATE,
    TemplateOptions,
    build_pair,
    hindsight_messages,
    render_prompt_ids,
    response_token_ids,
)

CONTEXT = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "Tell me about Paris."},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And Rome?"},
]


def _interaction(followup="Too long, one sentence please.", response="Rome is the capital of Italy."):
    return Interaction(id="c:4", conversation_id="c", turn=4, context=CONTEXT, response=response, followup=followup)


def test_followup_is_appended_inside_the_last_user_turn():
    msgs = hindsight_messages(CONTEXT, "  Too long.  ", "paper")
    assert [m["role"] for m in msgs] == [m["role"] for m in CONTEXT]
    assert msgs[:3] == CONTEXT[:3]
    assert msgs[-1]["content"] == "And Rome?" + PAPER_TEMPLATE.replace("{followup}", "Too long.")
    assert CONTEXT[-1]["content"] == "And Rome?"  # input not mutated


def test_named_and_custom_templates():
    assert "insufficient attempt" in hindsight_messages(CONTEXT, "x", "offline")[-1]["content"]
    assert OFFLINE_TEMPLATE.endswith("{followup}")
    custom = hindsight_messages(CONTEXT, "no emojis", "\n(later the user said: {followup})")
    assert custom[-1]["content"] == "And Rome?\n(later the user said: no emojis)"
    with pytest.raises(ValueError, match="followup"):
        hindsight_messages(CONTEXT, "x", "no placeholder here")
    with pytest.raises(ValueError, match="ends with a user"):
        hindsight_messages(CONTEXT[:3], "x")


def test_student_and_teacher_score_the_same_response_ids(tiny_tokenizer):
    pair = build_pair(tiny_tokenizer, _interaction())
    expected = tiny_tokenizer("Rome is the capital of Italy.", add_special_tokens=False)["input_ids"]
    assert pair.response == expected + [tiny_tokenizer.eos_token_id]
    assert len(pair.teacher_prompt) > len(pair.student_prompt)
    student_text = tiny_tokenizer.decode(pair.student_prompt)
    teacher_text = tiny_tokenizer.decode(pair.teacher_prompt)
    assert student_text.endswith("<|im_start|>assistant\n") and teacher_text.endswith("<|im_start|>assistant\n")
    assert "HINDSIGHT" in teacher_text and "HINDSIGHT" not in student_text
    assert teacher_text.index("And Rome?") < teacher_text.index("Too long, one sentence please.")


def test_left_truncation_keeps_the_end_and_response_is_capped(tiny_tokenizer):
    full = render_prompt_ids(tiny_tokenizer, CONTEXT)
    cut = render_prompt_ids(tiny_tokenizer, CONTEXT, max_prompt_tokens=10)
    assert cut == full[-10:]
    ids = response_token_ids(tiny_tokenizer, "word " * 50 + "   \n", append_eos=True, max_tokens=7)
    assert len(ids) == 7 and ids[-1] == tiny_tokenizer.eos_token_id
    assert response_token_ids(tiny_tokenizer, "abc  \n", append_eos=False) == \
        tiny_tokenizer("abc", add_special_tokens=False)["input_ids"]


def test_online_response_ids_are_used_verbatim(tiny_tokenizer):
    pair = build_pair(tiny_tokenizer, _interaction(), TemplateOptions(), response_ids=[5, 6, 7])
    assert pair.response == [5, 6, 7]


def test_thinking_is_disabled_where_the_template_supports_it(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    text = tok.decode(render_prompt_ids(tok, CONTEXT[1:2]))
    assert text.endswith("<think>\n\n</think>\n\n")

"""IFEval guard: strict/loose verdicts on crafted replies, accuracy arithmetic, the seeded subsample, offline runs."""

from __future__ import annotations

import json
import random
import socket
import types
from pathlib import Path

import pytest

from rayuid.feedback import ifeval

IFEVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "external" / "ifeval"
needs_data = pytest.mark.skipif(not (IFEVAL_DIR / "input_data.jsonl").is_file(),
                                reason=f"IFEval prompts not found at {IFEVAL_DIR}")

LOWER = "change_case:english_lowercase"
NO_COMMA = "punctuation:no_comma"
WORDS = "length_constraints:number_words"
END = "startend:end_checker"
SENTENCES = "length_constraints:number_sentences"
CAPS = "change_case:capital_word_frequency"
LOWER_TEXT = "this answer is written entirely in lowercase english words and it says nothing else at all"


def rec(*instructions, key=1, prompt="a prompt"):
    """A record with (instruction_id, kwargs) pairs."""
    return {"key": key, "prompt": prompt, "instruction_id_list": [i for i, _ in instructions],
            "kwargs": [k for _, k in instructions]}


def verdict(record, response):
    out = ifeval.score_response(record, response)
    return out["strict"], out["loose"]


@pytest.mark.parametrize("instruction,response,expected", [
    ((LOWER, {}), LOWER_TEXT, (True, True)),
    ((LOWER, {}), "This Answer Has Capitals In It And Is Written In English Words", (False, False)),
    ((NO_COMMA, {}), "No commas appear in this reply at all", (True, True)),
    ((NO_COMMA, {}), "Well, there is a comma here", (False, False)),
    ((WORDS, {"relation": "at least", "num_words": 10}), "one two three four five six seven eight nine ten",
     (True, True)),
    ((WORDS, {"relation": "at least", "num_words": 10}), "only five words right here", (False, False)),
    ((WORDS, {"relation": "less than", "num_words": 10}), "only five words right here", (True, True)),
    ((END, {"end_phrase": "Is there anything else I can help with?"}),
     "Here you go. Is there anything else I can help with?", (True, True)),
    ((END, {"end_phrase": "Is there anything else I can help with?"}),
     "Is there anything else I can help with? Here you go.", (False, False)),
], ids=["lower-ok", "lower-caps", "comma-ok", "comma-bad", "words-ok", "words-short", "words-less-than", "end-ok",
        "end-bad"])
def test_single_instruction_verdicts(instruction, response, expected):
    assert verdict(rec(instruction), response) == expected


def test_preamble_first_line_fails_strict_but_passes_loose():
    response = "Sure! Here is my answer:\n" + LOWER_TEXT
    assert verdict(rec((LOWER, {})), response) == (False, True)


def test_trailing_last_line_fails_strict_but_passes_loose():
    response = "Here you go. Is there anything else I can help with?\nHope that helps"
    assert verdict(rec((END, {"end_phrase": "Is there anything else I can help with?"})), response) == (False, True)


def test_markdown_asterisks_fail_strict_but_pass_loose():
    response = "Here you go. **Is there anything else I can help with?**"
    assert verdict(rec((END, {"end_phrase": "Is there anything else I can help with?"})), response) == (False, True)


def test_blank_response_fails_both():
    assert verdict(rec((NO_COMMA, {})), "   \n ") == (False, False)


def test_prompt_level_needs_every_instruction():
    out = ifeval.score_response(rec((LOWER, {}), (NO_COMMA, {})), LOWER_TEXT + ", with a comma")
    assert (out["strict"], out["loose"]) == (False, False)
    assert [(p["instruction_id"], p["strict"], p["loose"]) for p in out["per_instruction"]] == [
        (LOWER, True, True), (NO_COMMA, False, False)]


def test_loose_variants_are_the_eight_standard_ones():
    variants = ifeval.loose_variants("*first*\nmiddle *x*\nlast")
    assert variants == ["*first*\nmiddle *x*\nlast", "first\nmiddle x\nlast",  # raw, no asterisks
                        "middle *x*\nlast", "*first*\nmiddle *x*", "middle *x*",  # minus first / last / both lines
                        "middle x\nlast", "first\nmiddle x", "middle x"]  # the same without asterisks


def test_sentence_and_capital_word_checks_run_offline():
    few = rec((SENTENCES, {"relation": "less than", "num_sentences": 3}))
    assert verdict(few, "Just one sentence here.") == (True, True)
    assert verdict(few, "One. Two. Three. Four.") == (False, False)
    caps = rec((CAPS, {"capital_frequency": 2, "capital_relation": "at least"}))
    assert verdict(caps, "THIS is VERY important. Read it.") == (True, True)
    assert verdict(caps, "Nothing shouts here.") == (False, False)
    assert ifeval.SENTENCE_SPLITTER["mode"] in {"punkt_tab", "untrained-punkt"}


def test_sentence_fallback_needs_no_nltk_data(monkeypatch):
    import nltk.tokenize

    monkeypatch.setattr(nltk.tokenize, "punkt_model_available", lambda language="english": False)
    util = types.SimpleNamespace(nltk=nltk, _get_sentence_tokenizer=None)
    assert ifeval._install_sentence_fallback(util) == "untrained-punkt"
    assert len(util._get_sentence_tokenizer().tokenize("One here. Two here! Three here?")) == 3
    assert util.nltk.word_tokenize("HELLO there. BIG world.") == ["HELLO", "there", ".", "BIG", "world", "."]
    assert util.nltk.tokenize.RegexpTokenizer(r"\w+").tokenize("a b") == ["a", "b"]  # everything else is nltk's


def test_random_letter_draw_is_seeded_and_leaves_global_random_alone():
    record = rec(("keywords:letter_frequency", {"let_relation": "at least", "letter": "#", "let_frequency": 4}))
    random.seed(123)
    expected_next = random.random()
    texts = ("aaaa bbbb dddd pppp yyyy iiii", "####")
    random.seed(123)
    first = [ifeval.score_response(record, text)["strict"] for text in texts]
    assert random.random() == expected_next
    assert first == [ifeval.score_response(record, text)["strict"] for text in texts]


def test_unknown_instruction_is_an_error():
    with pytest.raises(KeyError, match="no:such"):
        ifeval.score_response(rec(("no:such", {})), "text")


def test_accuracy_arithmetic_on_a_hand_computed_set():
    records = [rec((NO_COMMA, {}), (LOWER, {}), key=1), rec((NO_COMMA, {}), key=2),
               rec((LOWER, {}), (NO_COMMA, {}), key=3)]
    responses = [LOWER_TEXT,                        # both pass strict and loose
                 "Yes, a comma",                    # fails both
                 "Intro Line\n" + LOWER_TEXT]       # lowercase: strict no / loose yes; no_comma: both yes
    acc = ifeval.ifeval_accuracy(records, responses)
    assert acc["n"] == 3
    assert acc["prompt_strict"] == pytest.approx(1 / 3) and acc["prompt_loose"] == pytest.approx(2 / 3)
    assert acc["instruction_strict"] == pytest.approx(3 / 5) and acc["instruction_loose"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="2 responses"):
        ifeval.ifeval_accuracy(records, responses[:2])


def test_subsample_is_seeded_and_in_file_order(tmp_path):
    path = tmp_path / "input_data.jsonl"
    path.write_text("".join(json.dumps(rec((NO_COMMA, {}), key=100 - i)) + "\n" for i in range(30)))
    keys = ifeval.record_keys(ifeval.load_ifeval(tmp_path, limit=5, seed=7))
    assert keys == ifeval.record_keys(ifeval.load_ifeval(path, limit=5, seed=7))
    assert keys != ifeval.record_keys(ifeval.load_ifeval(tmp_path, limit=5, seed=8))
    assert len(set(keys)) == 5 and keys == sorted(keys, reverse=True)  # file order (keys descend in this file)
    assert len(ifeval.load_ifeval(tmp_path)) == len(ifeval.load_ifeval(tmp_path, limit=99)) == 30
    with pytest.raises(ValueError):
        ifeval.load_ifeval(tmp_path, limit=0)


@needs_data
def test_real_prompts_load_and_subsample_deterministically():
    records = ifeval.load_ifeval(IFEVAL_DIR)
    assert len(records) == 541 and sum(len(r["instruction_id_list"]) for r in records) == 834
    keys = ifeval.record_keys(ifeval.load_ifeval(IFEVAL_DIR, limit=20, seed=0))
    assert keys == ifeval.record_keys(ifeval.load_ifeval(IFEVAL_DIR, limit=20, seed=0))
    assert len(set(keys)) == 20 and set(keys) <= set(ifeval.record_keys(records))


@needs_data
def test_run_ifeval_with_a_fake_model_over_20_real_prompts(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("IFEval scoring tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    seen = []

    def fake_generate(batch):
        seen.extend(batch)
        return [messages[-1]["content"].lower() for messages in batch]  # echo the prompt, lowercased

    result = ifeval.run_ifeval(fake_generate, IFEVAL_DIR, limit=20, seed=0)
    assert result["n"] == 20 and len(seen) == 20
    assert all(m == [{"role": "user", "content": m[0]["content"]}] for m in seen)
    for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert 0.0 <= result[name] <= 1.0
    assert result["prompt_strict"] <= result["prompt_loose"]
    assert result["instruction_strict"] <= result["instruction_loose"]
    assert result["keys"] == ifeval.record_keys(ifeval.load_ifeval(IFEVAL_DIR, limit=20, seed=0))
    assert [p["key"] for p in result["per_prompt"]] == result["keys"]
    assert (result["limit"], result["seed"], result["checker"]) == (20, 0, ifeval.CHECKER)
    assert result["sentence_splitter"] in {"punkt_tab", "untrained-punkt"}
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="20 strings"):
        ifeval.run_ifeval(lambda batch: ["x"], IFEVAL_DIR, limit=20, seed=0)

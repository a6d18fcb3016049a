"""Judges: programmatic verifiers and preferences, the position-swapped LLM judge protocol, win-rate statistics."""

from __future__ import annotations

import math

import pytest

from rayuid.feedback.judges import (
    CHECKABLE_PERSONAS,
    WinRate,
    adherence,
    judge_messages,
    judge_pair,
    judge_pairs,
    parse_verdict,
    programmatic_preference,
    verify,
    win_rate,
)
from rayuid.feedback.users import PERSONAS

FAMILY = "\U0001F468\u200D\U0001F469\u200D\U0001F467"  # one ZWJ family emoji (3 people, 2 joiners)
PERSONA = PERSONAS["concise"].description


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# --- win rate --------------------------------------------------------------------------------------------------

def test_win_rate_hand_computed():
    result = win_rate(["x"] * 7 + ["y"] * 3 + ["tie"] * 5)
    assert (result.wins, result.losses, result.ties, result.n_decisive) == (7, 3, 5, 10)
    assert result.rate == pytest.approx(0.7)
    assert result.se == pytest.approx(math.sqrt(0.21 / 10)) and result.se == pytest.approx(0.14491, abs=1e-5)
    assert result.to_json() == {"wins": 7, "losses": 3, "ties": 5, "n": 15, "rate": result.rate, "se": result.se,
                                "bootstrap_se": result.bootstrap_se, "n_boot": 1000, "seed": 0}


def test_win_rate_accepts_programmatic_labels_and_rejects_others():
    assert win_rate(["A", "B", "A", "tie"]).rate == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown outcome 'C'"):
        win_rate(["x", "C"])


def test_bootstrap_se_close_to_analytic_for_large_sample():
    result = win_rate(["x"] * 300 + ["y"] * 100)
    assert result.se == pytest.approx(math.sqrt(0.75 * 0.25 / 400))
    assert abs(result.bootstrap_se - result.se) < 0.1 * result.se


def test_bootstrap_deterministic_for_fixed_seed():
    outcomes = ["x"] * 7 + ["y"] * 3 + ["tie"] * 5
    assert win_rate(outcomes, seed=3).bootstrap_se == win_rate(outcomes, seed=3).bootstrap_se
    assert win_rate(outcomes, seed=3).bootstrap_se != win_rate(outcomes, seed=4).bootstrap_se
    assert 0 < win_rate(outcomes).bootstrap_se < 0.3


@pytest.mark.parametrize("outcomes", [[], ["tie"] * 4])
def test_no_decisive_pairs_gives_half_and_zero_se(outcomes):
    assert win_rate(outcomes) == WinRate(0, 0, len(outcomes), 0.5, 0.0, 0.0, 1000, 0)


def test_all_wins_has_zero_analytic_se():
    result = win_rate(["x"] * 5 + ["tie"])
    assert (result.rate, result.se) == (1.0, 0.0)


# --- LLM judge protocol ----------------------------------------------------------------------------------------

def test_judge_messages_protocol():
    messages = judge_messages("I want short answers.", "What is 2+2?", "Four.", "It is four, because ...")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "I want short answers." in messages[0]["content"]
    user = messages[1]["content"]
    assert "What is 2+2?" in user and user.index("Four.") < user.index("It is four, because")
    for phrase in ("style", "tone", "formatting", "verbosity", "complexity", "correct", "exactly one", "C if"):
        assert phrase in user


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B", "B"), ("C", "tie"), ("  b \n", "B"), ("a", "A"), ("c.", "tie"),
    ("Answer: B", "B"), ("**A**", "A"), ("(B)", "B"), ("B.", "B"), ("Verdict: **B**", "B"), ("answer: c", "tie"),
    ("The answer is a.", "A"), ("Response A is better than Response B.", "A"),
    ("<think>Response A is long, B is short.</think>\n\nB", "B"), ("<think>\n\n</think>\n\nA", "A"),
    ("A is long, so B.</think>\nB", "B"), ("<think>Response A is longer, so", None),
    ("Tie", "tie"), ("", None), (None, None), ("Both are equally fine.", None), ("I cannot decide", None),
    ("the answer is a bit unclear", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def always(answer):
    calls = []

    def judge_fn(batch):
        calls.append(batch)
        return [answer] * len(batch)
    judge_fn.calls = calls
    return judge_fn


def prefers_shorter(batch):
    """Reads back the two responses from the prompt and picks the shorter one by position."""
    out = []
    for messages in batch:
        user = messages[1]["content"]
        a = user.split("[Response A]\n")[1].split("\n[End of Response A]")[0]
        b = user.split("[Response B]\n")[1].split("\n[End of Response B]")[0]
        out.append("A" if len(a) < len(b) else "B" if len(b) < len(a) else "C")
    return out


def test_position_bias_is_a_tie():
    assert judge_pair(always("A"), PERSONA, "q", "short", "much longer reply") == "tie"
    assert judge_pair(always("B"), PERSONA, "q", "short", "much longer reply") == "tie"


def test_consistent_preference_wins_regardless_of_order():
    assert judge_pair(prefers_shorter, PERSONA, "q", "short", "much longer reply") == "x"
    assert judge_pair(prefers_shorter, PERSONA, "q", "much longer reply", "short") == "y"
    assert judge_pair(prefers_shorter, PERSONA, "q", "same", "same") == "tie"


def test_unparseable_or_mixed_verdicts_are_ties():
    assert judge_pair(always("I'm not sure"), PERSONA, "q", "x", "y") == "tie"
    answers = iter(["A", "garbage"])  # first says x, second unparseable
    assert judge_pair(lambda batch: [next(answers) for _ in batch], PERSONA, "q", "x", "y") == "tie"
    answers = iter(["A", "C"])  # x, then tie: disagreement
    assert judge_pair(lambda batch: [next(answers) for _ in batch], PERSONA, "q", "x", "y") == "tie"


def test_judge_pairs_one_call_in_order():
    judge_fn = always("C")
    prompts, xs, ys = ["p0", "p1", "p2"], ["x0", "x1", "x2"], ["y0", "y1", "y2"]
    assert judge_pairs(judge_fn, PERSONA, prompts, xs, ys) == ["tie"] * 3
    assert len(judge_fn.calls) == 1 and len(judge_fn.calls[0]) == 6
    expected = []
    for p, x, y in zip(prompts, xs, ys):
        expected += [judge_messages(PERSONA, p, x, y), judge_messages(PERSONA, p, y, x)]
    assert judge_fn.calls[0] == expected


def test_judge_pairs_mixed_results_and_errors():
    assert judge_pairs(prefers_shorter, PERSONA, ["p", "p"], ["s", "long one"], ["long one", "s"]) == ["x", "y"]
    judge_fn = always("A")
    assert judge_pairs(judge_fn, PERSONA, [], [], []) == [] and judge_fn.calls == []
    with pytest.raises(ValueError, match="equal lengths"):
        judge_pairs(judge_fn, PERSONA, ["p"], ["x"], [])
    with pytest.raises(RuntimeError, match="1 outputs for 2"):
        judge_pairs(lambda batch: ["A"], PERSONA, ["p"], ["x"], ["y"])


# --- programmatic verifiers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("persona, reply, params, expected", [
    ("concise", words(40), {}, True), ("concise", words(41), {}, False),
    ("concise", words(10), {"max_words": 9}, False), ("concise", "   ", {}, False),
    ("detailed", words(150), {}, True), ("detailed", words(149), {}, False),
    ("detailed", words(10), {"min_words": 10}, True),
    ("no_emojis", "Plain text, (c) 2024.", {}, True), ("no_emojis", f"Family {FAMILY}", {}, False),
    ("no_emojis", "Nice \U0001F44D\U0001F3FD", {}, False),
    ("formal", "The function returns a sorted list of integers.", {}, True),
    ("formal", "It's a sorted list.", {}, False), ("formal", "It returns a list!", {}, False),
    ("formal", "This is totally fine.", {}, False),
    ("no_lists", "Sort the list, then return it.", {}, True), ("no_lists", "Steps:\n- sort\n- return", {}, False),
    ("no_lists", "1. sort\n2. return", {}, False), ("no_lists", "## Sorting\nSort it.", {}, False),
    ("no_lists", "Use **sorted**.", {}, False),
    ("answer_directly", "The answer is 4.", {}, True), ("answer_directly", "Great question! It is 4.", {}, False),
    ("answer_directly", "Sure, it is 4.", {}, False), ("answer_directly", "It is:\n- 4", {}, False),
    ("all_caps", "THE ANSWER IS 4.", {}, True), ("all_caps", "The answer is 4.", {}, False),
    ("all_caps", "HELLO world", {"min_ratio": 0.5}, True),
    ("pirate", "Arr, the answer be 4, matey.", {}, True), ("pirate", "Aye, it is 4.", {}, False),
    ("pirate", "Aye, it is 4.", {"min_terms": 1}, True),
    ("no_filler", "It is 4.", {}, True), ("no_filler", "It is 4. Hope this helps!", {}, False),
])
def test_verify(persona, reply, params, expected):
    assert verify(persona, reply, **params) is expected


def test_verify_uncheckable_and_unknown():
    assert verify("concise_casual_beginner", "anything") is None
    with pytest.raises(ValueError, match="unknown persona"):
        verify("nope", "x")
    with pytest.raises(ValueError, match="no parameter"):
        verify("no_emojis", "x", max_words=3)
    assert set(CHECKABLE_PERSONAS) <= set(PERSONAS)


def test_adherence():
    assert adherence("concise", [words(5), words(50), "", words(40)]) == pytest.approx(0.5)
    assert adherence("concise", [words(50)], max_words=60) == 1.0
    assert math.isnan(adherence("detailed_casual_expert", ["x"]))
    assert math.isnan(adherence("concise", []))


@pytest.mark.parametrize("persona, a, b, params, expected", [
    ("concise", words(40), words(41), {}, "A"),      # pass beats fail even though the counts differ by < 10%
    ("concise", words(41), words(40), {}, "B"),
    ("concise", words(20), words(30), {}, "A"),      # both pass: fewer words, difference >= 10%
    ("concise", words(36), words(40), {}, "A"),      # exactly 10% of the larger
    ("concise", words(37), words(40), {}, "tie"),    # < 10%
    ("concise", words(200), words(100), {}, "B"),    # both fail: fewer words
    ("concise", "", words(100), {}, "B"),            # an empty reply never wins on length
    ("concise", " ", "", {}, "tie"),
    ("detailed", words(150), words(300), {}, "B"),   # both pass: more words
    ("detailed", words(150), words(160), {}, "tie"),
    ("detailed", words(10), words(149), {}, "B"),
    ("detailed", words(20), words(10), {"min_words": 15}, "A"),
    ("no_emojis", f"one {FAMILY}", "two \U0001F44D \U0001F600", {}, "A"),  # a ZWJ family counts once
    ("no_emojis", "plain", f"x {FAMILY}", {}, "A"),
    ("no_emojis", "plain", "also plain", {}, "tie"),
    ("no_lists", "prose", "more prose here", {}, "tie"),
    ("no_lists", "- a\n- b", "prose", {}, "B"),
    ("formal", "It's fine!", "Yeah, totally!", {}, "tie"),
    ("all_caps", "HELLO", "hello", {}, "A"),
])
def test_programmatic_preference(persona, a, b, params, expected):
    assert programmatic_preference(persona, a, b, **params) == expected


def test_programmatic_preference_needs_a_check():
    with pytest.raises(ValueError, match="no programmatic check"):
        programmatic_preference("concise_casual_beginner", "a", "b")

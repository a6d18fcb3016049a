"""Simulated users: exact rule thresholds, Unicode emoji counting, stable phrasing, LLM prompt and cleaning."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import pytest

from rayuid.feedback.users import (
    _SAY,
    GENERIC_FOLLOWUP,
    MAX_FOLLOWUP_CHARS,
    PERSONAS,
    LLMUserSimulator,
    RuleUserSimulator,
    clean_followup,
    emoji_count,
    find_contractions,
    has_markdown_list,
    make_persona,
    make_simulator,
    markdown_features,
    pirate_term_count,
    uppercase_ratio,
    user_model_messages,
    word_count,
)
from rayuid.system.actors.user import UserSimulatorWorker

RULE_PERSONAS = ["concise", "detailed", "no_emojis", "formal", "casual", "no_lists", "answer_directly", "no_filler",
                 "pirate", "all_caps"]


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def kind_of(text: str) -> str:
    """Which _SAY situation produced `text`: each template must match in full ({fields} match anything)."""
    keys = {key for key, options in _SAY.items() for option in options
            if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(option)), text)}
    assert len(keys) == 1, f"{text!r} matches {keys or 'no template'}"
    return keys.pop()


def say(persona: str, reply: str, **params) -> str:
    return make_persona(persona, **params).rule("Explain it.", reply)


# ---------------------------------------------------------------- checks

def test_word_count_counts_tokens_with_letters_or_digits():
    assert word_count("") == 0
    assert word_count("don't stop — 3.5 well-known 😀 - *") == 4
    assert word_count("- one\n- two\n\n1. three") == 4


@pytest.mark.parametrize("text, n", [
    ("😀", 1), ("\U0001F468\u200d\U0001F469\u200d\U0001F467", 1), ("\U0001F1E9\U0001F1EA", 1), ("👍🏽", 1),
    ("1\ufe0f\u20e3", 1), ("#\ufe0f\u20e3", 1), ("\u2764\ufe0f", 1), (("\U0001F3F4\U000E0067\U000E0062\U000E0073"
    "\U000E0063\U000E0074\U000E007F"), 1), ("🧑🏽\u200d💻", 1), ("☕", 1), ("🕊", 1), ("🫠", 1),
    ("Paris 🇫🇷 is lovely 😀😀 👨\u200d👩\u200d👧\u200d👦!", 4),
    ("Hello! (ok) -- ... ? ; : :) ;-) <3 * # 1.", 0), ("© ™ ® ↔ ✓ ✔ ❤ → …", 0), ("\u2615\ufe0e", 0),
    ("日本語のテキスト, Ünïcödé, Ελληνικά", 0), ("1\ufe0f", 0)])
def test_emoji_count_by_grapheme_cluster(text, n):
    assert emoji_count(text) == n


def test_uppercase_ratio_and_markdown_and_contractions():
    assert uppercase_ratio("ABC def") == 0.5
    assert uppercase_ratio("HELLO, WORLD 123!") == 1.0
    assert uppercase_ratio("123 !?") == 0.0
    assert has_markdown_list("Steps:\n- boil\n- eat") and has_markdown_list("1. boil\n2) eat")
    assert not has_markdown_list("A well-known fact: 5 - 3 = 2. *Not* a list.")
    assert markdown_features("## Title\n**Bold** text\n* item\n3. step") == [
        "bullet points", "numbered lists", "headers", "bold text"]
    assert markdown_features("#hashtag and 2*3*4 and snake_case_name") == []
    assert find_contractions("I don't think it's John's or its. We're here; you’ll see, y'all.") == [
        "don't", "it's", "We're", "you’ll", "y'all"]
    assert pirate_term_count("Arr, matey! Ye be right, aye.") == 4
    assert pirate_term_count("Yes, the year is arbitrary; tech-savvy heartiness.") == 0


# ---------------------------------------------------------------- rule personas

def test_concise_threshold_is_exact_and_configurable():
    assert kind_of(say("concise", words(40))) == "concise_ok"
    assert kind_of(say("concise", words(41))) == "concise_near"
    assert kind_of(say("concise", words(80))) == "concise_near"
    assert kind_of(say("concise", words(81))) == "concise_far"
    assert kind_of(say("concise", words(5), max_words=5)) == "concise_ok"
    assert kind_of(say("concise", words(6), max_words=5)) == "concise_near"
    assert "at most about 5 words" in make_persona("concise", max_words=5).description


def test_detailed_threshold_is_exact():
    assert kind_of(say("detailed", words(150))) == "detailed_ok"
    assert kind_of(say("detailed", words(149))) == "detailed_near"
    assert kind_of(say("detailed", words(49))) == "detailed_far"
    assert kind_of(say("detailed", words(10), min_words=10)) == "detailed_ok"


def test_no_emojis_counts_clusters_and_ignores_punctuation():
    assert kind_of(say("no_emojis", "Plain text! With punctuation :) and © ™ → ...")) == "no_emojis_ok"
    for reply in ("Done 😀", "Flag 🇯🇵", "Family 👨\u200d👩\u200d👧", "Keycap 1\ufe0f\u20e3", "Heart \u2764\ufe0f"):
        assert kind_of(say("no_emojis", reply)) == "no_emojis", reply
    followup = say("no_emojis", "Hi 👨\u200d👩\u200d👧 🇯🇵 👍🏽")
    assert "3" in followup or followup == "No emojis, please. I find them distracting."


def test_formal_flags_contractions_exclamations_and_casual_words():
    assert kind_of(say("formal", "The committee will review John's proposal within five days.")) == "formal_ok"
    dont = say("formal", "We don't ship on Sundays.")
    assert kind_of(dont) == "formal" and '"don\'t"' in dont and "exclamation" not in dont
    bang = say("formal", "Your order has shipped!")
    assert kind_of(bang) == "formal" and "exclamation marks" in bang and "contractions" not in bang
    for casual in ("hey", "awesome", "gonna"):
        assert f'"{casual}"' in say("formal", f"The results are {casual} in every respect.").lower()


def test_casual_flags_stiff_wording():
    assert kind_of(say("casual", "Furthermore, the results are good.")) == "casual_words"
    assert kind_of(say("casual", words(30))) == "casual_tone"
    assert kind_of(say("casual", "Yeah, it's easy. You'll boil it for ten minutes and you're done.")) == "casual_ok"


def test_no_lists_and_answer_directly_name_what_to_drop():
    assert kind_of(say("no_lists", "Boil the water, then add the pasta.")) == "no_lists_ok"
    listy = say("no_lists", "Steps:\n- boil\n- add pasta")
    assert kind_of(listy) == "no_lists" and "bullet points" in listy
    assert "headers" in say("no_lists", "# Pasta\nBoil it.") and "bold" in say("no_lists", "Boil **ten** minutes.")
    assert kind_of(say("answer_directly", "Ten minutes.")) == "answer_directly_ok"
    assert kind_of(say("answer_directly", "Surely ten minutes is enough.")) == "answer_directly_ok"
    intro = say("answer_directly", "Great question! Ten minutes.")
    assert kind_of(intro) == "answer_directly" and "intro" in intro and "bullet" not in intro
    assert "bullet points" in say("answer_directly", "Ten minutes:\n- boil")
    assert kind_of(say("no_filler", "Great question! Ten minutes. Hope this helps.")) == "no_filler"
    assert kind_of(say("no_filler", "Ten minutes.")) == "no_filler_ok"


def test_pirate_and_all_caps_thresholds():
    assert kind_of(say("pirate", "Boil it ten minutes, aye.")) == "pirate"
    assert kind_of(say("pirate", "Arr, boil it ten minutes, matey.")) == "pirate_ok"
    assert kind_of(say("all_caps", "BOIL IT FOR TEN MINUTES, OK?")) == "all_caps_ok"
    assert uppercase_ratio("ABCDEFGHI j") == 0.9 and kind_of(say("all_caps", "ABCDEFGHI j")) == "all_caps_ok"
    lower = say("all_caps", "ABCDEFGH ij")  # 8/10 < 0.9
    assert kind_of(lower) == "all_caps" and (lower.endswith("ONLY 80% OF THAT WAS UPPERCASE.") or "80%" not in lower)
    assert kind_of(say("all_caps", "ABCDEFGH ij", min_ratio=0.8)) == "all_caps_ok"


@pytest.mark.parametrize("name", RULE_PERSONAS)
def test_every_rule_persona_handles_empty_replies_and_stays_short(name):
    assert kind_of(PERSONAS[name].rule("Q?", "   ")) == "empty"
    for reply in ("", words(5), words(200), "Great question! 😀\n- a\n- b", "ARR MATEY, AYE."):
        followup = PERSONAS[name].rule("Q?", reply)
        assert followup and followup != GENERIC_FOLLOWUP and len(followup) <= MAX_FOLLOWUP_CHARS


def test_phrasing_is_deterministic_and_varies_across_replies():
    rule = PERSONAS["concise"].rule
    replies = [words(100) + f" v{i}" for i in range(30)]
    first = [rule("Q?", r) for r in replies]
    assert first == [rule("Q?", r) for r in replies]
    assert len(set(first)) >= 2 and all(kind_of(f) == "concise_far" for f in first)


def test_phrasing_does_not_depend_on_the_process_hash_seed():
    code = "from rayuid.feedback.users import PERSONAS; print(PERSONAS['formal'].rule('q', \"Don't! v%d\" % 7))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {PERSONAS["formal"].rule("q", "Don't! v7") + "\n"}


def test_personas_pickle_for_ray_and_cover_the_brief():
    assert set(RULE_PERSONAS) <= set(PERSONAS)
    assert "concise_casual_beginner" in PERSONAS and PERSONAS["concise_casual_beginner"].rule is None
    clone = pickle.loads(pickle.dumps(make_persona("concise", max_words=3)))
    assert kind_of(clone.rule("q", words(4))) == "concise_near"


# ---------------------------------------------------------------- LLM user model

@pytest.mark.parametrize("raw, expected", [
    ('User: "Too long."', "Too long."), ("**User:** Way too long", "Way too long"),
    ("User's next message: Shorter, please.", "Shorter, please."), ('"User: Fewer emojis."', "Fewer emojis."),
    ("<think>They want brevity.</think>\n\n  \u201cToo   long.\u201d  ", "Too long."),
    ('"Too long." He said "ok"', '"Too long." He said "ok"'), ("Users: too long", "Users: too long"),
    ("", GENERIC_FOLLOWUP), (None, GENERIC_FOLLOWUP), ('  ""  ', GENERIC_FOLLOWUP), ("User:", GENERIC_FOLLOWUP),
    ("<think>I should say it is too long", GENERIC_FOLLOWUP), ("...", GENERIC_FOLLOWUP)])
def test_clean_followup(raw, expected):
    assert clean_followup(raw) == expected


def test_clean_followup_truncates_at_sentence_or_word():
    long = "Too long. " * 50
    out = clean_followup(long, max_chars=100)
    assert len(out) <= 100 and out.endswith("Too long.")
    out = clean_followup("word " * 100, max_chars=42)
    assert len(out) <= 42 and out.endswith("word") and clean_followup("x", fallback="F") == "x"
    assert clean_followup("   ", fallback="") == ""


def test_user_model_prompt_plays_the_profile_and_does_not_answer():
    persona = make_persona("concise", max_words=25)
    messages = user_model_messages(persona, "How do I boil pasta?", "Boil water, add pasta, wait ten minutes.")
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert persona.description in system and "USER PROFILE" in system
    assert "Do not answer" in system and "brief" in system and "Output only" in system
    assert "How do I boil pasta?" in user and "Boil water, add pasta, wait ten minutes." in user
    assert "How do I boil pasta?" not in system and "Assistant response:" in user
    assert user.rstrip().endswith("Write the user's next message.")


class FakeGenerate:
    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    def __call__(self, batch, max_tokens, temperature):
        self.calls.append((batch, max_tokens, temperature))
        return self.outputs[: len(batch)]


def test_llm_simulator_batches_once_cleans_and_counts_fallbacks():
    fake = FakeGenerate(["User: Too long.", "", "<think>x</think>", '"Good, thanks."'])
    sim = make_simulator("llm", "concise", fake, max_tokens=64, temperature=0.5, max_words=30)
    out = sim.respond(["p1", "p2", "p3", "p4"], ["r1", "r2", "r3", "r4"])
    assert out == ["Too long.", GENERIC_FOLLOWUP, GENERIC_FOLLOWUP, "Good, thanks."]
    assert len(fake.calls) == 1 and sim.calls == 1 and sim.fallbacks == 2
    batch, max_tokens, temperature = fake.calls[0]
    assert (len(batch), max_tokens, temperature) == (4, 64, 0.5)
    assert "about 30 words" in batch[0][0]["content"] and "r3" in batch[2][1]["content"]
    assert sim.respond([], []) == [] and len(fake.calls) == 1
    with pytest.raises(RuntimeError, match="returned 1 outputs for 2"):
        LLMUserSimulator(PERSONAS["concise"], FakeGenerate(["x"])).respond(["a", "b"], ["c", "d"])


def test_make_simulator_errors_are_actionable():
    with pytest.raises(ValueError, match="known personas: .*concise.*no_emojis"):
        make_simulator("rule", "laconic")
    with pytest.raises(ValueError, match='use kind="llm"'):
        make_simulator("rule", "detailed_professional_expert")
    with pytest.raises(ValueError, match='use "rule" or "llm"'):
        make_simulator("regex", "concise")
    with pytest.raises(ValueError, match="needs a generate_fn"):
        make_simulator("llm", "concise")
    with pytest.raises(ValueError, match="accepted: max_words"):
        make_simulator("rule", "concise", min_words=3)
    with pytest.raises(ValueError, match="out of range"):
        make_persona("all_caps", min_ratio=1.5)
    with pytest.raises(ValueError, match="one reply per prompt"):
        RuleUserSimulator(PERSONAS["concise"]).respond(["a"], [])
    assert isinstance(make_simulator("rule", "concise", max_tokens=8), RuleUserSimulator)


# ---------------------------------------------------------------- worker

class FakeEngine:
    def __init__(self):
        self.calls = 0

    def chat(self, message_lists, max_tokens, temperature):
        self.calls += 1
        return ["" if i % 2 else "Shorter, please." for i in range(len(message_lists))]


def test_user_worker_rule_and_llm():
    worker = UserSimulatorWorker("rule", "concise", {"max_words": 3})
    assert [kind_of(f) for f in worker.respond(["a", "b"], ["one two three", "one two three four"])] == [
        "concise_ok", "concise_near"]
    assert worker.stats() == {"kind": "rule", "persona": "concise", "calls": 1, "replies": 2, "fallbacks": 0}
    engine = FakeEngine()
    llm = UserSimulatorWorker("llm", "no_emojis", {"max_tokens": 32, "temperature": 0.0}, engine_factory=lambda: engine)
    assert llm.respond(["a", "b", "c"], ["x", "y", "z"]) == ["Shorter, please.", GENERIC_FOLLOWUP, "Shorter, please."]
    assert engine.calls == 1 and llm.stats()["fallbacks"] == 1 and llm.stats()["replies"] == 3
    with pytest.raises(ValueError, match="engine_factory"):
        UserSimulatorWorker("llm", "concise", {})

"""Held-out evaluation arithmetic: adherence, win rate vs base, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayuid.system.evaluation import eval_point, table, write_curve


def test_eval_point_for_a_checkable_persona():
    base = ["word " * 60, "word " * 50, "short answer here", "word " * 45]
    after = ["word " * 10, "word " * 55, "short answer here", "word " * 30]
    point = eval_point("concise", {}, 40, 5, base, after)
    assert point["adherence"] == pytest.approx(3 / 4)  # 10, 3 and 30 words pass; 55 fails
    wr = point["win_rate_vs_base"]
    # pair 1: pass vs fail -> win; pair 2: both fail, 55 vs 50 words (10% rule: 55*0.1=5.5 > 5) -> tie;
    # pair 3: identical -> tie; pair 4: pass vs fail -> win
    assert (wr["wins"], wr["losses"], wr["ties"]) == (2, 0, 2) and wr["rate"] == 1.0
    assert point["mean_words"] == pytest.approx((10 + 55 + 3 + 30) / 4)
    assert (point["interactions"], point["version"]) == (40, 5)


def test_uncheckable_persona_reports_length_only():
    point = eval_point("concise_casual_beginner", {}, 0, 0, ["a b"], ["a b c"])
    assert "adherence" not in point and point["mean_words"] == 3


def test_table_and_curve(tmp_path):
    base = ["word " * 60, "word " * 70]
    points = [eval_point("concise", {}, 0, 0, base, base), eval_point("concise", {}, 16, 2, base, ["ok", "fine"])]
    samples = {"prompts": ["p1", "p2"], "before": base, "after": ["ok", "fine"]}
    text = table(points, samples)
    assert "adherence" in text and "1.00" in text and "prompt: p1" in text
    assert write_curve(tmp_path, points, samples).stat().st_size > 1000
    assert (tmp_path / "eval.json").exists()


def test_the_in_context_oracle_is_a_table_column_and_a_dashed_line(tmp_path):
    import json

    from rayuid.data.prompts import Prompt, with_system_prompt

    base = ["word " * 60, "word " * 70]
    points = [eval_point("concise", {}, 0, 0, base, base), eval_point("concise", {}, 16, 2, base, ["ok", "word " * 80])]
    oracle = eval_point("concise", {}, 0, 0, base, ["short", "also short"])
    samples = {"prompts": ["p1", "p2"], "before": base, "after": ["ok", "word " * 80]}
    header, words, apology, adherence, win = table(points, samples, oracle).splitlines()[:5]
    assert header.split()[-1] == "oracle" and adherence.split()[1:] == ["0.00", "0.50", "1.00"]
    assert win.split()[4:7] == ["0.50", "0.50", "1.00"]                  # policy 1W/1L; oracle wins both
    write_curve(tmp_path, points, samples, oracle)
    assert json.loads((tmp_path / "eval.json").read_text())["oracle"]["adherence"] == 1.0
    prompt = Prompt("p", [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}])
    assert with_system_prompt(prompt, "I want short answers.").messages == [
        {"role": "system", "content": "Be nice.\n\nI want short answers."}, {"role": "user", "content": "Hi"}]


def test_apologies_are_counted_as_a_quality_guard():
    from rayuid.feedback.judges import apologizes

    yes = ["I'm sorry for the misunderstanding.", "Sure. I apologize, here it is", "My apologies! HTTP is..."]
    no = ["HTTP is plain, HTTPS is encrypted.", "Nobody is sorry here" + " x" * 80 + " I'm sorry"]
    assert [apologizes(r) for r in yes + no] == [True] * 3 + [False] * 2
    point = eval_point("concise", {}, 0, 0, ["a", "b"], ["I'm sorry, no.", "Fine."])
    assert point["apology_rate"] == 0.5


def test_the_base_and_oracle_replies_come_from_one_greedy_batch(monkeypatch):
    """The first evaluation answers the held-out prompts and their in-context-oracle versions in one engine call
    (one decode pass serves both); later evaluations ask for the held-out prompts alone."""
    from rayuid.config import load_config
    from rayuid.data.prompts import Prompt
    from rayuid.system import evaluation

    batches = []

    def fake_greedy(calls, tokenizer, prompts, options, max_tokens):
        batches.append(prompts)
        return ["word " * 60 if p.messages[0]["role"] == "user" else "short" for p in prompts]

    monkeypatch.setattr(evaluation, "greedy_replies", fake_greedy)
    cfg = load_config(Path(__file__).parents[1] / "jobs" / "online_smollm2_concise.yaml", [])
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": f"question {i}"}]) for i in range(3)]
    heldout = evaluation.HeldoutEval(cfg, prompts, options=None)
    first = heldout(None, None, 0, 0)
    assert len(batches) == 1 and batches[0][:3] == prompts and len(batches[0]) == 6
    assert all(p.messages[0]["role"] == "system" for p in batches[0][3:])
    assert heldout.base == ["word " * 60] * 3 and first["adherence"] == 0.0
    assert heldout.oracle["adherence"] == 1.0 and heldout.oracle["win_rate_vs_base"]["wins"] == 3
    heldout(None, None, 8, 1)
    assert len(batches) == 2 and batches[1] == prompts

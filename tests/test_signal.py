"""Signal analysis: per-token advantages under unrelated vs feedback follow-ups, heatmaps and summary."""

from __future__ import annotations

import json

import pytest
import torch

from rayuid.data.templates import hindsight_messages, render_prompt_ids
from rayuid.offline.signal import case_advantages, run_signal
from rayuid.sdpo.models import load_causal_lm, load_tokenizer
from rayuid.sdpo.scoring import collate, response_logprobs

CASE = {"id": "demo", "tag": "constrain", "raw_prompt": "Tell me about Paris.",
        "unrelated_followup": "What is 27*4?", "feedback_followup": "Too long, one sentence please."}


def test_case_advantages_equal_separate_scoring(tiny_model_dir):
    tok, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    response = [40, 41, 42, 43, tok.eos_token_id]
    adv = case_advantages(model, tok, CASE, response, "offline")
    context = [{"role": "user", "content": CASE["raw_prompt"]}]

    def lp(messages):
        batch = collate([render_prompt_ids(tok, messages)], [response], tok.pad_token_id)
        with torch.no_grad():
            return response_logprobs(model, batch)[0]

    base = lp(context)
    for kind in ("unrelated", "feedback"):
        expected = lp(hindsight_messages(context, CASE[f"{kind}_followup"], "offline")) - base
        assert torch.allclose(torch.tensor(adv[kind]), expected, atol=1e-5)


def test_run_signal_writes_heatmaps_and_summary(tmp_path, tiny_model_dir):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"defaults": {"max_new_tokens": 6, "temperature": 1.0},
                                 "cases": [CASE, dict(CASE, id="second")]}))
    summary = run_signal(str(cases), str(tmp_path / "out"), model_name=tiny_model_dir)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["num_cases"] == 2 and len(saved["cases"]) == 2
    for row in saved["cases"]:
        assert row["mean_abs_adv_feedback"] >= 0 and row["mean_abs_adv_unrelated"] >= 0
        assert (tmp_path / "out").joinpath(row["heatmap"].split("/")[-1]).stat().st_size > 1000
    assert summary["mean_abs_adv_feedback"] == pytest.approx(
        sum(r["mean_abs_adv_feedback"] for r in saved["cases"]) / 2)


def test_bad_case_file_is_reported(tmp_path, tiny_model_dir):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"cases": [{"id": "x", "raw_prompt": "hi"}]}))
    with pytest.raises(ValueError, match="lack one of"):
        run_signal(str(cases), str(tmp_path / "out"), model_name=tiny_model_dir)

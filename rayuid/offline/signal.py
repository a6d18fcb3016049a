"""Signal analysis (paper §6.8, Figs 7–8): where does the hindsight advantage fall, token by token?

For each case we sample a reply y to the prompt, then score it under the plain context x, under x + an unrelated
follow-up and under x + a relevant feedback follow-up. A_i = log π(y_i|x,o,y<i) − log π(y_i|x,y<i) should be
near zero for the unrelated follow-up and structured for the feedback one.

    rayuid signal --cases signal_analysis_cases.json --out runs/signal [--model M]
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rayuid.data.extract import Interaction
from rayuid.data.templates import TemplateOptions, build_pair, render_prompt_ids
from rayuid.records.plots import plot_advantage_heatmap
from rayuid.sdpo.models import load_causal_lm, load_tokenizer, resolve_model
from rayuid.sdpo.scoring import collate, response_logprobs


def load_cases(path: str | Path) -> tuple[list[dict], dict]:
    """The paper's case file: ``{defaults, cases: [{id, tag, raw_prompt, unrelated_followup, feedback_followup}]}``."""
    raw = json.loads(Path(path).read_text())
    cases = raw["cases"] if isinstance(raw, dict) else raw
    needed = {"id", "raw_prompt", "unrelated_followup", "feedback_followup"}
    bad = [c.get("id", i) for i, c in enumerate(cases) if not needed <= set(c)]
    if bad:
        raise ValueError(f"{path}: cases {bad} lack one of {sorted(needed)}; see the paper's signal_analysis_cases.json")
    return cases, raw.get("defaults", {}) if isinstance(raw, dict) else {}


def sample_response(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> list[int]:
    ids = render_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=temperature > 0, temperature=max(temperature, 1e-5), top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def case_advantages(model, tokenizer, case: dict, response: list[int], template: str) -> dict[str, list[float]]:
    """Per-token A under each follow-up, all three views scored in one batch."""
    context = [{"role": "user", "content": case["raw_prompt"]}]
    options = TemplateOptions(hindsight=template)
    pairs = {
        kind: build_pair(tokenizer, Interaction(id=case["id"], conversation_id=case["id"], turn=0, context=context,
                                           response="", followup=case[f"{kind}_followup"]),
                         options, response_ids=response)
        for kind in ("unrelated", "feedback")
    }
    prompts = [pairs["feedback"].student_prompt, pairs["unrelated"].teacher_prompt, pairs["feedback"].teacher_prompt]
    batch = collate(prompts, [response] * 3, tokenizer.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(model, batch)
    return {"unrelated": (lp[1] - lp[0]).tolist(), "feedback": (lp[2] - lp[0]).tolist()}


def run_signal(cases_path: str, out: str, model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
               template: str = "offline", max_new_tokens: int | None = None, seed: int = 123,
               limit: int | None = None) -> dict:
    """Sample, score, plot one heatmap per case, and write ``OUT/summary.json``."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model_name)
    tokenizer, model = load_tokenizer(path), load_causal_lm(path, "float32")
    cases, defaults = load_cases(cases_path)
    cases = cases[:limit] if limit else cases
    max_new = max_new_tokens or int(defaults.get("max_new_tokens", 256))
    rng = random.Random(seed)
    summary = {"model": model_name, "template": template, "max_new_tokens": max_new, "cases": []}
    for i, case in enumerate(tqdm(cases, desc="signal cases")):
        response = sample_response(model, tokenizer, case["raw_prompt"], max_new,
                                   float(defaults.get("temperature", 1.0)), rng.randrange(2**31))
        adv = case_advantages(model, tokenizer, case, response, template)
        tokens = [tokenizer.decode([t]) for t in response]
        png = plot_advantage_heatmap(tokens, adv, out_dir / f"{i:02d}_{case['id']}.png",
                                     title=f"{case['id']} ({case.get('tag', '')})")
        summary["cases"].append(_case_summary(case, tokens, adv, png))
    summary.update(_aggregate(summary["cases"]))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean_abs(values: list[float]) -> float:
    return sum(abs(v) for v in values) / max(len(values), 1)


def _case_summary(case: dict, tokens: list[str], adv: dict[str, list[float]], png: Path) -> dict:
    return {"id": case["id"], "tag": case.get("tag"), "response": "".join(tokens), "tokens": len(tokens),
            "mean_abs_adv_feedback": _mean_abs(adv["feedback"]), "mean_abs_adv_unrelated": _mean_abs(adv["unrelated"]),
            "mean_adv_feedback": sum(adv["feedback"]) / max(len(tokens), 1),
            "mean_adv_unrelated": sum(adv["unrelated"]) / max(len(tokens), 1), "heatmap": str(png)}


def _aggregate(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    feedback = sum(r["mean_abs_adv_feedback"] for r in rows) / n
    unrelated = sum(r["mean_abs_adv_unrelated"] for r in rows) / n
    stronger = sum(r["mean_abs_adv_feedback"] > r["mean_abs_adv_unrelated"] for r in rows)
    return {"mean_abs_adv_feedback": feedback, "mean_abs_adv_unrelated": unrelated,
            "cases_feedback_stronger": stronger, "num_cases": len(rows)}

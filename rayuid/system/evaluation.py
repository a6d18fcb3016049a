"""Held-out evaluation during online runs: greedy replies of the current policy vs the base model's.

With a rule-checkable persona (concise, no_emojis, ...) the measures are programmatic: adherence (share of replies
the persona accepts), a pairwise win rate vs the base model's reply to the same prompt (``judges``), and mean
length. The curve (one point per evaluation) is written to ``eval.json`` and plotted to ``eval_curve.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayuid.data.prompts import with_system_prompt
from rayuid.feedback.measures import style_measures
from rayuid.feedback.users import make_persona
from rayuid.records.plots import plt
from rayuid.system import phases


def greedy_replies(calls, tokenizer, prompts: list, options, max_tokens: int, users: list[str | None] | None = None,
                   unknown_user: str = "base") -> list[str]:
    """One greedy reply per prompt from the rollout engines (whatever version they serve now; ``users[i]``: the
    adapter that answers prompt i)."""
    sampling = phases.Sampling({"n": 1, "temperature": 0.0, "max_tokens": max_tokens}, 0, unknown_user)
    samples = phases.generate(calls, tokenizer, prompts, -1, sampling, options, users)
    return [s.generation.text for s in samples]


def eval_point(persona: str, params: dict, interactions: int, version: int, base: list[str],
               replies: list[str]) -> dict:
    """Measures of ``replies`` against the base model's replies to the same held-out prompts."""
    measures, wr = style_measures(persona, params, replies, base)
    point = {"interactions": interactions, "version": version, **measures}
    if wr is not None:
        point["win_rate_vs_base"] = wr.to_json()
    return point


def write_curve(run_dir: Path, points: list[dict], samples: dict, oracle: dict | None = None) -> Path:
    """``eval.json`` and ``eval_curve.png`` (the in-context oracle, when measured, as a dashed line)."""
    (run_dir / "eval.json").write_text(json.dumps({"points": points, "samples": samples, "oracle": oracle},
                                                  indent=2))
    xs = [p["interactions"] for p in points]
    panels = [("mean_words", "mean reply words")]
    if "adherence" in points[0]:
        panels = [("adherence", "adherence"), ("win_rate_vs_base", "win rate vs base")] + panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ys = [p[key]["rate"] if isinstance(p[key], dict) else p[key] for p in points]
        ax.plot(xs, ys, marker="o", label="policy")
        if oracle is not None and key in oracle:
            value = oracle[key]["rate"] if isinstance(oracle[key], dict) else oracle[key]
            ax.axhline(value, color="grey", linestyle="--", label="in-context oracle")
            ax.legend(fontsize=7)
        ax.set_xlabel("training interactions")
        ax.set_title(f"held-out {title}")
    fig.tight_layout()
    out = run_dir / "eval_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def table(points: list[dict], samples: dict, oracle: dict | None = None) -> str:
    """A before/after table (and the in-context oracle) and a couple of sample replies, for the terminal."""
    first, last, o = points[0], points[-1], oracle or {}
    rows = [f"{'held-out (' + str(len(samples.get('prompts', []))) + ' prompts)':<28}{'before':>10}{'after':>10}"
            f"{'oracle':>10}"]
    rows.append(f"{'mean reply words':<28}{first['mean_words']:>10.1f}{last['mean_words']:>10.1f}"
                f"{o.get('mean_words', float('nan')):>10.1f}")
    rows.append(f"{'opens with an apology':<28}{first['apology_rate']:>10.2f}{last['apology_rate']:>10.2f}"
                f"{o.get('apology_rate', float('nan')):>10.2f}")
    if "adherence" in last:
        rows.append(f"{'adherence':<28}{first['adherence']:>10.2f}{last['adherence']:>10.2f}"
                    f"{o.get('adherence', float('nan')):>10.2f}")
        wr, owr = last["win_rate_vs_base"], o.get("win_rate_vs_base", {}).get("rate", float("nan"))
        rows.append(f"{'win rate vs base':<28}{'0.50':>10}{wr['rate']:>10.2f}{owr:>10.2f}  (after: ±{wr['se']:.2f}; "
                    f"{wr['wins']}W/{wr['losses']}L/{wr['ties']}T)")
    for prompt, old, new in list(zip(samples["prompts"], samples["before"], samples["after"]))[:2]:
        rows += ["", f"prompt: {prompt}", f"  before: {old[:300]}", f"  after:  {new[:300]}"]
    return "\n".join(rows)


class HeldoutEval:
    """Evaluation state of one run: the base model's replies (the first call), the in-context oracle (the base model
    with the persona as system prompt; only when the run starts from the base) and the curve so far."""

    def __init__(self, cfg, prompts: list, options):
        self.cfg, self.prompts, self.options = cfg, prompts, options
        self.base: list[str] | None = None
        self.oracle: dict | None = None
        self.points: list[dict] = []
        self.last: list[str] = []

    def _greedy(self, calls, tokenizer, prompts: list) -> list[str]:
        return greedy_replies(calls, tokenizer, prompts, self.options, self.cfg.online.sampling.max_tokens)

    def __call__(self, calls, tokenizer, interactions: int, version: int) -> dict:
        o = self.cfg.online
        oracle_prompts = []
        if self.base is None and interactions == 0:  # in the same batch: one decode pass serves both
            profile = make_persona(o.user.persona, **o.user.params).description
            oracle_prompts = [with_system_prompt(p, profile) for p in self.prompts]
        replies = self._greedy(calls, tokenizer, self.prompts + oracle_prompts)
        replies, oracle = replies[:len(self.prompts)], replies[len(self.prompts):]
        if self.base is None:
            self.base = replies
            if oracle:
                self.oracle = eval_point(o.user.persona, dict(o.user.params), 0, 0, self.base, oracle)
        self.last = replies
        point = eval_point(o.user.persona, dict(o.user.params), interactions, version, self.base, replies)
        self.points.append(point)
        return point

    def finish(self, run_dir: Path) -> str:
        samples = {"prompts": [p.messages[-1]["content"] for p in self.prompts], "before": self.base,
                   "after": self.last}
        write_curve(run_dir, self.points, samples, self.oracle)
        return table(self.points, samples, self.oracle)

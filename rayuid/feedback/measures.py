"""What a persona makes of a set of replies: length, apologies, adherence, and win rates against other replies."""

from __future__ import annotations

from typing import Callable

from rayuid.feedback import judges
from rayuid.feedback.users import make_persona


def style_measures(persona: str, params: dict, replies: list[str], base: list[str]) -> tuple[dict, object]:
    """Mean length and apology rate; for a rule-checkable persona also adherence and the programmatic win rate of
    ``replies`` vs ``base`` (same prompts), else None for the win rate."""
    n = max(len(replies), 1)
    out = {"mean_words": sum(len(r.split()) for r in replies) / n,
           "apology_rate": sum(map(judges.apologizes, replies)) / n}
    if judges.verify(persona, "probe", **params) is None:
        return out, None
    out["adherence"] = judges.adherence(persona, replies, **params)
    return out, judges.win_rate([judges.programmatic_preference(persona, a, b, **params) for a, b in zip(replies, base)])


JudgeFn = Callable[[str, list[str], list[str]], list[str]]
"""(persona description, replies x, replies y) → "x" / "y" / "tie" per held-out prompt (``judges.judge_pairs``)."""


def measure(persona: str, params: dict, replies: list[str], base: list[str], judge: JudgeFn | None = None) -> dict:
    """Mean length; for checkable personas adherence and programmatic win rate vs base; with an LLM judge its win
    rate too (``judge_*``), which is also *the* win rate of personas no rule can check."""
    out, wr = style_measures(persona, params, replies, base)
    if wr is not None:
        out.update(win_rate=wr.rate, win_rate_se=wr.se, wins=wr.wins, losses=wr.losses, ties=wr.ties)
    if judge is not None:
        wr = judges.win_rate(judge(make_persona(persona, **params).description, replies, base))
        out.update(judge_win_rate=wr.rate, judge_win_rate_se=wr.se, judge_wins=wr.wins, judge_losses=wr.losses,
                   judge_ties=wr.ties)
        if "win_rate" not in out:
            out.update(win_rate=wr.rate, win_rate_se=wr.se, wins=wr.wins, losses=wr.losses, ties=wr.ties)
    return out

"""Evaluation judges (paper §6.6): programmatic verifiers, the pairwise LLM judge protocol, and win-rate statistics.

* Verifiers reuse the predicates behind the rule personas in `rayuid.feedback.users` (word_count, emoji_count, ...), so a
  "pass" here means exactly what the rule user would accept; parameters and defaults come from `make_persona`.
* The LLM judge sees the persona as its system prompt and answers A, B or C (tie). Each pair is asked twice with
  the positions swapped; only two agreeing verdicts count, anything else is a tie. `judge_fn` is injected
  (batched: list of chat conversations -> list of texts), so nothing here imports Ray or vLLM.
* Win rate = wins / (wins + losses), ties ignored, with an analytic and a seeded bootstrap standard error.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from rayuid.feedback.users import (
    CASUAL_WORDS,
    FILLER_OPENER,
    FILLER_PHRASES,
    STIFF_WORDS,
    Messages,
    emoji_count,
    find_contractions,
    find_words,
    make_persona,
    markdown_features,
    pirate_term_count,
    uppercase_ratio,
    word_count,
)

JudgeFn = Callable[[list[Messages]], Sequence[str]]


# ---------------------------------------------------------------------------------------------------------------
# Programmatic verifiers
# ---------------------------------------------------------------------------------------------------------------

def _concise(reply: str, *, max_words: float) -> bool:
    return word_count(reply) <= max_words


def _detailed(reply: str, *, min_words: float) -> bool:
    return word_count(reply) >= min_words


def _no_emojis(reply: str) -> bool:
    return emoji_count(reply) == 0


def _formal(reply: str) -> bool:
    return not (find_contractions(reply) or "!" in reply or find_words(reply, CASUAL_WORDS))


def _casual(reply: str, *, min_words: float) -> bool:
    """As the casual rule user: no stiff connectives, and a longer reply needs at least one contraction."""
    stiff_tone = word_count(reply) >= min_words and not find_contractions(reply)
    return not (find_words(reply, STIFF_WORDS) or stiff_tone)


def _no_lists(reply: str) -> bool:
    return not markdown_features(reply)


def _answer_directly(reply: str) -> bool:
    return not (FILLER_OPENER.match(reply) or markdown_features(reply))


def _no_filler(reply: str) -> bool:
    return not find_words(reply, FILLER_PHRASES)


def _pirate(reply: str, *, min_terms: float) -> bool:
    return pirate_term_count(reply) >= min_terms


def _all_caps(reply: str, *, min_ratio: float) -> bool:
    return uppercase_ratio(reply) >= min_ratio


_VERIFIERS: dict[str, Callable[..., bool]] = {
    "concise": _concise, "detailed": _detailed, "no_emojis": _no_emojis, "formal": _formal, "casual": _casual,
    "no_lists": _no_lists, "answer_directly": _answer_directly, "no_filler": _no_filler, "pirate": _pirate,
    "all_caps": _all_caps,
}
CHECKABLE_PERSONAS: tuple[str, ...] = tuple(_VERIFIERS)


def _resolve(persona_name: str, params: dict[str, float]) -> Callable[[str], bool] | None:
    """The persona's check with its parameters bound, or None when it is not checkable. `make_persona` validates
    the name and parameters and fills the defaults; its rule is a documented `functools.partial`, whose keywords
    are the resolved parameters (so defaults live in users.py only)."""
    persona = make_persona(persona_name, **params)
    check = _VERIFIERS.get(persona_name)
    if check is None or persona.rule is None:
        return None
    bound = partial(check, **persona.rule.keywords)
    return lambda reply: bool(reply.strip()) and bound(reply)  # an empty reply never passes, as in users._guarded


def verify(persona_name: str, reply: str, **params: float) -> bool | None:
    """True if `reply` satisfies the persona's checkable preference, False if not, None if the persona has no
    programmatic check (e.g. the 2x2x2 style profiles). An empty reply fails. Unknown names/params raise."""
    check = _resolve(persona_name, params)
    return None if check is None else check(reply)


_APOLOGY = re.compile(r"\b(i'?m sorry|i am sorry|sorry for|i apologi[sz]e|my apologies|apologies for)\b", re.IGNORECASE)


def apologizes(reply: str) -> bool:
    """An apology in the first 80 characters: the hindsight teacher, shown "too long!", likes to open with one, and
    a policy that learns the opener instead of the style answers worse (a quality guard, not a preference)."""
    return bool(_APOLOGY.search(reply[:80]))


def adherence(persona: str, replies: Sequence[str], **params: float) -> float:
    """Fraction of replies that pass `verify`, ignoring None verdicts; NaN when nothing was checkable."""
    check = _resolve(persona, params)
    if check is None or not replies:
        return math.nan
    return sum(check(reply) for reply in replies) / len(replies)


def _graded(persona: str, reply_a: str, reply_b: str) -> str:
    """Tie-break when both or neither reply passes: fewer words (concise) / more words (detailed) if the counts
    differ by at least 10% of the larger one; fewer emojis (no_emojis); otherwise a tie."""
    if persona == "no_emojis":
        n_a, n_b = emoji_count(reply_a), emoji_count(reply_b)
        return "A" if n_a < n_b else "B" if n_b < n_a else "tie"
    if persona in ("concise", "detailed"):
        n_a, n_b = word_count(reply_a), word_count(reply_b)
        if n_a == n_b or 10 * abs(n_a - n_b) < max(n_a, n_b):
            return "tie"
        shorter_is_a = n_a < n_b
        return "A" if shorter_is_a == (persona == "concise") else "B"
    return "tie"


def programmatic_preference(persona: str, reply_a: str, reply_b: str, **params: float) -> str:
    """"A", "B" or "tie" from the persona's check: a passing reply beats a failing one; otherwise a non-empty reply
    beats an empty one, then `_graded` decides. Raises ValueError for a persona without a check."""
    check = _resolve(persona, params)
    if check is None:
        raise ValueError(f"persona {persona!r} has no programmatic check; checkable: {', '.join(CHECKABLE_PERSONAS)}")
    ok_a, ok_b = check(reply_a), check(reply_b)
    if ok_a != ok_b:
        return "A" if ok_a else "B"
    empty_a, empty_b = not reply_a.strip(), not reply_b.strip()
    if empty_a or empty_b:
        return "tie" if empty_a and empty_b else "B" if empty_a else "A"
    return _graded(persona, reply_a, reply_b)


# ---------------------------------------------------------------------------------------------------------------
# Pairwise LLM judge (position-swapped)
# ---------------------------------------------------------------------------------------------------------------

_JUDGE_SYSTEM = "USER PROFILE:\n{persona}"
_JUDGE_USER = """Act as a strict evaluator for the user described by the profile above. Two assistant responses to \
the same request follow. Decide which one better matches that user's preferences.

Consider only style, tone, formatting, verbosity and complexity. Do not judge whether the content is correct, \
complete or helpful beyond what the profile asks for.

[Request]
{prompt}

[Response A]
{reply_a}
[End of Response A]

[Response B]
{reply_b}
[End of Response B]

Reply with exactly one character: A if Response A matches the profile better, B if Response B does, or C if they \
match it equally well. Output nothing else."""


def judge_messages(persona_description: str, prompt: str, reply_a: str, reply_b: str) -> Messages:
    """Chat messages for one judgement: the persona is the system prompt, the user turn holds the task."""
    return [{"role": "system", "content": _JUDGE_SYSTEM.format(persona=persona_description)},
            {"role": "user", "content": _JUDGE_USER.format(prompt=prompt, reply_a=reply_a, reply_b=reply_b)}]


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_UPPER = re.compile(r"(?<![\w'])([ABC])(?![\w'])")
_LABELLED = re.compile(r"\b(?:answer|verdict|choice|winner|preference|output|response|option)\b[\s*_:=\-]*"
                       r"(?:is\b[\s*_:]*)?\(?([abc])(?![\w'])(?!\W{0,3}[a-z])", re.IGNORECASE)
_LETTERS = {"A": "A", "B": "B", "C": "tie"}


def parse_verdict(text: str | None) -> str | None:
    """"A", "B", "tie" (for C) or None. Like the paper's local judge, the first A/B/C wins, but only as a standalone
    capital after any <think> block ("Answer: B" is B, not the A of "Answer"; "**A**", "(B)"). Lower case counts
    only after a label and not followed by a word ("answer: b", not "the answer is a bit ..."), or as the whole
    reply ("b."); else the word "tie" gives a tie. An unfinished <think> block (truncated reasoning) gives None."""
    text = _THINK.sub(" ", text or "")
    if "</think>" in text.lower():  # the chat template opened the block; keep what follows its end
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    if "<think>" in text.lower():
        return None
    for pattern in (_UPPER, _LABELLED):
        if match := pattern.search(text):
            return _LETTERS[match.group(1).upper()]
    bare = re.sub(r"\W", "", text).upper()
    if bare in _LETTERS:
        return _LETTERS[bare]
    return "tie" if re.search(r"\btie\b", text, re.IGNORECASE) else None


def _combine(first: str | None, second: str | None) -> str:
    """x was A in `first`, y was A in `second`; agreeing verdicts count, anything else (incl. None) is a tie."""
    as_xy = {"A": "x", "B": "y", "tie": "tie"}.get(first)
    as_yx = {"A": "y", "B": "x", "tie": "tie"}.get(second)
    return as_xy if as_xy is not None and as_xy == as_yx else "tie"


def judge_pairs(judge_fn: JudgeFn, persona_description: str, prompts: Sequence[str], xs: Sequence[str],
                ys: Sequence[str]) -> list[str]:
    """"x", "y" or "tie" per pair, from ONE `judge_fn` call on 2N conversations, ordered
    [x0 as A, y0 as A, x1 as A, y1 as A, ...]. No call at all for N = 0."""
    if not len(prompts) == len(xs) == len(ys):
        raise ValueError(f"need equal lengths (got {len(prompts)} prompts, {len(xs)} xs, {len(ys)} ys)")
    if not prompts:
        return []
    batch = []
    for prompt, x, y in zip(prompts, xs, ys):
        batch += [judge_messages(persona_description, prompt, x, y), judge_messages(persona_description, prompt, y, x)]
    raw = list(judge_fn(batch))
    if len(raw) != len(batch):
        raise RuntimeError(f"judge returned {len(raw)} outputs for {len(batch)} conversations")
    verdicts = [parse_verdict(text) for text in raw]
    return [_combine(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(prompts))]


def judge_pair(judge_fn: JudgeFn, persona_description: str, prompt: str, reply_x: str, reply_y: str) -> str:
    """"x", "y" or "tie" for one pair, judged twice with positions swapped (one batched `judge_fn` call)."""
    return judge_pairs(judge_fn, persona_description, [prompt], [reply_x], [reply_y])[0]


# ---------------------------------------------------------------------------------------------------------------
# Win-rate statistics
# ---------------------------------------------------------------------------------------------------------------

_WIN, _LOSS, _TIE = ("x", "A"), ("y", "B"), ("tie",)


@dataclass(frozen=True)
class WinRate:
    """wins / (wins + losses), ties ignored. With no decisive pair the rate is 0.5 and both SEs are 0."""
    wins: int
    losses: int
    ties: int
    rate: float
    se: float             # analytic: sqrt(p (1 - p) / n_decisive)
    bootstrap_se: float   # std (n-1) of the rate over `n_boot` resamples of the whole outcome list
    n_boot: int
    seed: int

    @property
    def n_decisive(self) -> int:
        return self.wins + self.losses

    def to_json(self) -> dict:
        return {"wins": self.wins, "losses": self.losses, "ties": self.ties, "n": self.wins + self.losses + self.ties,
                "rate": self.rate, "se": self.se, "bootstrap_se": self.bootstrap_se, "n_boot": self.n_boot,
                "seed": self.seed}


def _rate(wins: int, losses: int) -> float:
    return wins / (wins + losses) if wins + losses else 0.5


def _bootstrap_se(codes: list[int], n_boot: int, seed: int) -> float:
    """Resample the outcome list (ties included) with replacement; the rate of each resample uses the same tie
    rule as `win_rate`. Codes: 1 win, -1 loss, 0 tie."""
    rng = random.Random(seed)
    rates = []
    for _ in range(n_boot):
        sample = rng.choices(codes, k=len(codes))
        rates.append(_rate(sample.count(1), sample.count(-1)))
    return statistics.stdev(rates) if len(rates) > 1 else 0.0


def win_rate(outcomes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> WinRate:
    """Outcomes are judge_pair's "x" (win) / "y" (loss) / "tie"; programmatic_preference's "A" / "B" / "tie" are
    accepted too (the evaluated model as A). Anything else raises ValueError."""
    codes = []
    for outcome in outcomes:
        if outcome not in _WIN + _LOSS + _TIE:
            raise ValueError(f"unknown outcome {outcome!r}; expected x/A (win), y/B (loss) or tie")
        codes.append(1 if outcome in _WIN else -1 if outcome in _LOSS else 0)
    wins, losses = codes.count(1), codes.count(-1)
    rate = _rate(wins, losses)
    if not wins + losses:
        return WinRate(wins, losses, codes.count(0), 0.5, 0.0, 0.0, n_boot, seed)
    se = math.sqrt(rate * (1 - rate) / (wins + losses))
    return WinRate(wins, losses, codes.count(0), rate, se, _bootstrap_se(codes, n_boot, seed), n_boot, seed)

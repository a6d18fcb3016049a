"""IFEval capability guard (Zhou et al. 2023), fully offline.

Prompts come from a local ``input_data.jsonl`` (541 prompts, 834 verifiable instructions of 25 types; here:
``../shared/data/external/ifeval``). The instruction checkers are the official google-research ones as bundled by the
PyPI package ``if-verifiable`` (``if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT``); only its registry is
used, the strict/loose protocol below is this module's own, written after the paper's ``evaluation_lib``:

* strict: an instruction is followed when ``check_following(response)`` holds on the raw (non-blank) response;
* loose: it is followed when it holds on any of the 8 standard variants: the response, with its first line removed,
  its last line removed, both removed, and each of those four with every ``*`` removed;
* prompt-level accuracy counts a prompt when all its instructions are followed; instruction-level counts each.

Offline: nothing is downloaded. Two checks need NLTK's ``punkt_tab`` sentence model, which is not installable here
(``length_constraints:number_sentences`` via ``count_sentences``, ``change_case:capital_word_frequency`` via
``nltk.word_tokenize``, which splits sentences before its Treebank word split). When that model is missing,
:func:`checker_registry` swaps in, for those two call sites only, an *untrained* ``PunktSentenceTokenizer`` (same
algorithm, no learned abbreviations: "Dr. Smith" counts as two sentences), so sentence counts are approximate; the
word split stays Treebank, and uppercase-word counts are essentially unchanged. :data:`SENTENCE_SPLITTER` and
``run_ifeval``'s result say which was used. With ``punkt_tab`` installed (``NLTK_DATA``) the official path is used.

Reproducible: ``langdetect`` (``language:response_language``, ``change_case:english_*``) is seeded, and so is the
random letter the official ``keywords:letter_frequency`` checker draws for prompts 1122 and 1129 (see _build_checker).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path

CHECKER = "if-verifiable==0.1.2"
SENTENCE_SPLITTER = {"mode": None}  # "punkt_tab" (official) or "untrained-punkt" (offline fallback); set on first use

GenerateFn = Callable[[list[list[dict]]], list[str]]


def load_ifeval(path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Records of ``path`` (a directory holding ``input_data.jsonl``, or the file itself), in file order.

    With ``limit`` (< the number of records) a fixed subsample: ``limit`` records drawn by ``random.Random(seed)``,
    kept in file order; the same ``(limit, seed)`` always gives the same keys (see :func:`record_keys`).
    """
    path = Path(path)
    file = path / "input_data.jsonl" if path.is_dir() else path
    records = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    for rec in records:
        missing = {"key", "prompt", "instruction_id_list", "kwargs"} - rec.keys()
        if missing or len(rec["instruction_id_list"]) != len(rec["kwargs"]):
            raise ValueError(f"{file}: malformed IFEval record {rec.get('key')!r} (missing {sorted(missing)})")
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in chosen]


def record_keys(records: list[dict]) -> list[int]:
    """The IFEval keys of ``records`` (what a report records to name the subsample)."""
    return [rec["key"] for rec in records]


def loose_variants(response: str) -> list[str]:
    """The 8 responses the loose metric tries: raw, minus first/last/both lines, and each without asterisks."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", "")] + cut + [text.replace("*", "") for text in cut]


class _OfflineNltk:
    """Stands in for the ``nltk`` module inside the checkers' util module: all of nltk, except that
    ``word_tokenize`` splits sentences with an untrained Punkt tokenizer (no ``punkt_tab`` needed)."""

    def __init__(self, nltk_module, splitter):
        self._nltk, self._splitter = nltk_module, splitter

    def __getattr__(self, name):
        return getattr(self._nltk, name)

    def word_tokenize(self, text, language="english", preserve_line=False):
        sentences = [text] if preserve_line else self._splitter.tokenize(text)
        return [tok for sent in sentences for tok in self._nltk.word_tokenize(sent, language, preserve_line=True)]


def _install_sentence_fallback(util) -> str:
    """Point the checkers' two sentence-split call sites at an untrained Punkt tokenizer if ``punkt_tab`` is absent."""
    import nltk
    from nltk.tokenize import punkt_model_available
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    if punkt_model_available("english"):
        return "punkt_tab"
    splitter = PunktSentenceTokenizer()
    util._get_sentence_tokenizer = lambda: splitter  # used by count_sentences (number_sentences)
    util.nltk = _OfflineNltk(nltk, splitter)  # used by capital_word_frequency via util.nltk.word_tokenize
    return "untrained-punkt"


@functools.lru_cache(maxsize=1)
def checker_registry() -> dict:
    """``instruction_id -> checker class`` (official IFEval checkers), made usable offline on first call."""
    import langdetect
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect is randomized; fixed so scores reproduce
    SENTENCE_SPLITTER["mode"] = _install_sentence_fallback(instructions_util)
    return dict(INSTRUCTION_DICT)


def _build_checker(record: dict, index: int):
    """The checker of instruction ``index`` of ``record``, built as the official evaluation builds it.

    A checker draws missing or invalid arguments from the global ``random`` (in the data: prompts 1122 and 1129 give
    ``keywords:letter_frequency`` a non-letter, ``#`` / ``!``, so a random letter is checked). That draw is seeded
    per (key, index) so scores reproduce; the caller's ``random`` state is restored afterwards.
    """
    registry = checker_registry()
    instruction_id, kwargs = record["instruction_id_list"][index], record["kwargs"][index]
    if instruction_id not in registry:
        raise KeyError(f"unknown IFEval instruction {instruction_id!r}")
    checker = registry[instruction_id](instruction_id)
    state = random.getstate()
    try:
        random.seed(f"ifeval:{record['key']}:{index}")
        checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=record["prompt"])
    finally:
        random.setstate(state)
    return checker


def score_response(record: dict, response: str) -> dict:
    """Strict and loose verdicts of ``response`` for one IFEval record.

    Returns ``{"strict": bool, "loose": bool, "per_instruction": [{"instruction_id", "strict", "loose"}, ...]}``;
    the prompt-level verdicts are ``all(...)`` over the instructions.
    """
    variants = loose_variants(response)
    per_instruction = []
    for index, instruction_id in enumerate(record["instruction_id_list"]):
        checker = _build_checker(record, index)
        strict = bool(response.strip() and checker.check_following(response))
        loose = strict or any(v.strip() and checker.check_following(v) for v in variants)
        per_instruction.append({"instruction_id": instruction_id, "strict": strict, "loose": bool(loose)})
    return {"strict": all(p["strict"] for p in per_instruction),
            "loose": all(p["loose"] for p in per_instruction),
            "per_instruction": per_instruction}


def _accuracy_from_scores(scores: list[dict]) -> dict:
    instructions = [p for s in scores for p in s["per_instruction"]]
    n, m = len(scores), len(instructions)
    if n == 0:
        raise ValueError("no records to score")
    return {"prompt_strict": sum(s["strict"] for s in scores) / n,
            "prompt_loose": sum(s["loose"] for s in scores) / n,
            "instruction_strict": sum(p["strict"] for p in instructions) / m,
            "instruction_loose": sum(p["loose"] for p in instructions) / m,
            "n": n}


def ifeval_accuracy(records: list[dict], responses: list[str]) -> dict:
    """Prompt- and instruction-level strict/loose accuracy of ``responses`` (one per record, same order)."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    return _accuracy_from_scores([score_response(r, resp) for r, resp in zip(records, responses)])


def ifeval_messages(records: list[dict]) -> list[list[dict]]:
    """One single-turn chat (the IFEval prompt as the user message, no system prompt) per record."""
    return [[{"role": "user", "content": rec["prompt"]}] for rec in records]


def run_ifeval(generate_fn: GenerateFn, path, limit: int | None = None, seed: int = 0) -> dict:
    """Generate one reply per IFEval prompt with ``generate_fn`` (batch of message lists -> replies) and score them.

    Returns the accuracies of :func:`ifeval_accuracy` plus what makes the number reproducible: ``keys`` (the
    prompts scored), ``limit``, ``seed``, ``checker``, ``sentence_splitter``, and ``per_prompt``
    (``{"key", "strict", "loose"}``). Run it on the same ``(limit, seed)`` before and after adaptation.
    """
    records = load_ifeval(path, limit=limit, seed=seed)
    responses = list(generate_fn(ifeval_messages(records)))
    if len(responses) != len(records) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"generate_fn must return {len(records)} strings, got {len(responses)} items")
    scores = [score_response(rec, resp) for rec, resp in zip(records, responses)]
    result = _accuracy_from_scores(scores)
    result.update(keys=record_keys(records), limit=limit, seed=seed, checker=CHECKER,
                  sentence_splitter=SENTENCE_SPLITTER["mode"],
                  per_prompt=[{"key": rec["key"], "strict": s["strict"], "loose": s["loose"]}
                              for rec, s in zip(records, scores)])
    return result

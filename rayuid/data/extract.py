"""Raw chat logs -> SDPO interactions (x, y, o), following the paper's extraction rules (paper-spec §4.1).

x is the chat history up to a user prompt, y the assistant reply and o the user's next message. The steps:

1. **Normalise** each conversation. Roles map to user/assistant/system. Dropped messages are counted by
   reason: empty or whitespace-only (``empty_message``), unknown role (``unknown_role``), wrong type
   (``wrong_type``) and missing key (``missing_field``).
2. **Filter** whole conversations: too few messages, too long in total, an over-long assistant or user
   message, or a language not in the list.
3. **Extract** one interaction for every assistant message that a user message follows. x is the history
   before it, cut to the last ``max_context_messages`` messages. Leading assistant turns are dropped and
   same-role runs are collapsed. x must end with a user turn.

Choices the paper leaves open. Downstream numbers depend on them, so they are written down here:

- **System messages.** The paper's code drops them, because they are not human/gpt. We keep a *leading*
  system message because it is history the reply was conditioned on. It stays at the front of every x and
  is not counted in ``max_context_messages``, so x holds at most that many user/assistant messages plus
  the system message. A system message anywhere else is dropped and counted as ``system_not_first``.
  ``min_messages`` counts only user/assistant messages, so a system prompt does not make a single
  exchange multi-turn. ``max_conversation_chars`` counts every message, the system message included.
- **Already-extracted records.** These come in two formats: paper-code ``prompt/completion/user_response``
  and our own ``context/response/followup``. Such a record is treated as the conversation x + [y, o]. Every
  filter except ``min_messages`` applies to it, and x is rebuilt with the same rules, so re-reading our own
  output is a no-op.
- **Duplicate ids.** An interaction whose id was already produced, for example because the same file was
  given twice, is dropped and counted as ``duplicate_id``.
- Message text is kept as written. Whitespace is stripped only to test for emptiness.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rayuid.config import ExtractConfig
from rayuid.data.readers import (
    ROLES,
    RawRecord,
    detect_format,
    iter_records,
    label,
    normalise_conversation,
    record_conversation_id,
    record_messages,
)
from rayuid.records.atomic import write_atomic

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5

HINTS = {
    "too_few_messages": "lower min_messages (an interaction needs a user prompt, a reply and a user follow-up)",
    "conversation_too_long": "raise max_conversation_chars",
    "assistant_message_too_long": "raise max_assistant_chars or set it to None",
    "user_message_too_long": "raise max_user_chars or set it to None",
    "language_filtered": "set languages to None, or list the names the records' `language` field uses",
    "no_followup": "the conversations never have a user message right after an assistant message",
    "context_not_ending_with_user": "the history before each reply must end with a user message",
    "line_too_large": "raise max_line_bytes",
    "invalid_json": "each .jsonl line must hold one JSON object",
    "invalid_utf8": "re-encode the file as UTF-8",
    "missing_field": "records need `messages`, `conversation`, `conversations` or `history` (or "
    "`prompt`+`completion`+`user_response`, or `context`+`response`+`followup`); messages need role and content",
    "wrong_type": "records must be JSON objects, conversations lists, and message contents strings",
    "unknown_role": f"message roles must be one of {sorted(ROLES)}",
    "empty_message": "messages must contain non-whitespace text",
    "duplicate_id": "records share conversation ids (is an input given twice?); give each record a unique id",
    "unreadable_file": "the file is corrupt or truncated",
    "non_text_part": "only text content parts are kept; images and other parts are dropped",
    "system_not_first": "only a leading system message is kept",
}


DEFAULT_CONFIG = ExtractConfig()


@dataclass(frozen=True)
class Interaction:
    """One (x, y, o) tuple: ``context`` (x, ends with a user turn), ``response`` (y) and ``followup`` (o)."""

    id: str
    conversation_id: str
    turn: int
    context: list[dict]
    response: str
    followup: str

    def to_json(self) -> dict:
        """The OUT.jsonl record, with exactly the six field keys."""
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "turn": self.turn,
            "context": [{"role": m["role"], "content": m["content"]} for m in self.context],
            "response": self.response,
            "followup": self.followup,
        }

    @classmethod
    def from_json(cls, d: dict) -> Interaction:
        """Inverse of ``to_json``. It is strict; use ``load_interactions`` for files that may be malformed."""
        context = [{"role": m["role"], "content": m["content"]} for m in d["context"]]
        return cls(str(d["id"]), str(d["conversation_id"]), int(d["turn"]), context, d["response"], d["followup"])


@dataclass
class ExtractReport:
    """What extraction read, kept and dropped. Every dropped line, record, message or pair is counted here."""

    conversations_read: int = 0
    interactions: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, where: str) -> None:
        """Count one drop; the first few locations are kept so a user can open the offending line."""
        self.rejected[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(where)

    def to_json(self) -> dict:
        """The REPORT json; reasons are ordered by count, largest first."""
        reasons = [r for r, _ in self.rejected.most_common()]
        return {
            "conversations_read": self.conversations_read,
            "interactions": self.interactions,
            "rejected": {r: self.rejected[r] for r in reasons},
            "examples": {r: list(self.examples.get(r, [])) for r in reasons},
        }

    def summary(self) -> str:
        """One paragraph for the terminal, with the largest rejection reasons first."""
        head = f"Read {self.conversations_read:,} conversations and extracted {self.interactions:,} interactions."
        if not self.rejected:
            return head + " Nothing was rejected."
        parts = [f"{r} {n:,} (e.g. {(self.examples.get(r) or ['?'])[0]})" for r, n in self.rejected.most_common()]
        return f"{head} Rejected {self.rejected.total():,}: " + "; ".join(parts) + "."


class NoInteractionsError(ValueError):
    """Extraction kept nothing. The message names the inputs, the main reasons and how to fix them."""

    def __init__(self, message: str, report: ExtractReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def conversation_filter(
    messages: list[dict], language: Any, config: ExtractConfig, check_count: bool = True
) -> str | None:
    """The paper's conversation-level filters; returns the first failing reason or None."""
    if check_count and sum(m["role"] != "system" for m in messages) < config.min_messages:
        return "too_few_messages"
    if sum(len(m["content"]) for m in messages) > config.max_conversation_chars:
        return "conversation_too_long"
    for role, limit in (("assistant", config.max_assistant_chars), ("user", config.max_user_chars)):
        if limit is not None and any(m["role"] == role and len(m["content"]) > limit for m in messages):
            return f"{role}_message_too_long"
    if config.languages is not None:
        wanted = {lang.casefold() for lang in config.languages}
        if not isinstance(language, str) or language.strip().casefold() not in wanted:
            return "language_filtered"
    return None


def build_context(history: list[dict], max_messages: int) -> list[dict] | None:
    """x from the messages before y: last N turns, leading assistants dropped, same-role runs collapsed.

    Returns None when x would not end with a user message (the paper skips those pairs).
    """
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = [m for m in history if m["role"] != "system"][-max_messages:]
    while turns and turns[0]["role"] == "assistant":
        turns = turns[1:]
    collapsed: list[dict] = []
    for m in turns:
        if collapsed and collapsed[-1]["role"] == m["role"]:
            collapsed[-1] = {"role": m["role"], "content": collapsed[-1]["content"] + "\n\n" + m["content"]}
        else:
            collapsed.append({"role": m["role"], "content": m["content"]})
    if not collapsed or collapsed[-1]["role"] != "user":
        return None
    return [dict(m) for m in system] + collapsed


def conversation_interactions(
    conversation_id: str, messages: list[dict], max_context_messages: int = 5
) -> tuple[list[Interaction], int]:
    """Every (x, y, o) of a normalised conversation, plus how many assistant->user pairs were skipped."""
    found: list[Interaction] = []
    skipped = 0
    for i in range(len(messages) - 1):
        if messages[i]["role"] != "assistant" or messages[i + 1]["role"] != "user":
            continue
        context = build_context(messages[:i], max_context_messages)
        if context is None:
            skipped += 1
            continue
        y, o = messages[i]["content"], messages[i + 1]["content"]
        found.append(Interaction(f"{conversation_id}:{i}", conversation_id, i, context, y, o))
    return found, skipped


def _from_conversation(
    record: dict, fmt: str, cid: str, where: str, config: ExtractConfig, report: ExtractReport
) -> list[Interaction]:
    """Interactions of a full conversation record, after normalisation and the conversation filters."""
    raw = record_messages(record, fmt)
    if isinstance(raw, str):
        report.reject(raw, where)
        return []
    messages, problems = normalise_conversation(raw)
    for problem in problems:
        report.reject(problem, where)
    reason = conversation_filter(messages, record.get("language"), config)
    if reason:
        report.reject(reason, where)
        return []
    found, skipped = conversation_interactions(cid, messages, config.max_context_messages)
    for _ in range(skipped):
        report.reject("context_not_ending_with_user", where)
    if not found and not skipped:
        report.reject("no_followup", where)
    return found


def _from_interaction(
    record: dict, fmt: str, cid: str, where: str, config: ExtractConfig, report: ExtractReport
) -> list[Interaction]:
    """An already-extracted record, validated as the conversation x + [y, o] (no min_messages check)."""
    keys = ("context", "response", "followup") if fmt == "ours" else ("prompt", "completion", "user_response")
    if any(k not in record for k in keys):
        report.reject("missing_field", where)
        return []
    prompt, response, followup = (record[k] for k in keys)
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(prompt, list) or not isinstance(response, str) or not isinstance(followup, str):
        report.reject("wrong_type", where)
        return []
    history, problems = normalise_conversation(prompt)
    for problem in problems:
        report.reject(problem, where)
    pseudo = history + [{"role": "assistant", "content": response}, {"role": "user", "content": followup}]
    context = build_context(history, config.max_context_messages)
    reason = "empty_message" if not (response.strip() and followup.strip()) else None
    reason = reason or conversation_filter(pseudo, record.get("language"), config, check_count=False)
    reason = reason or (None if context is not None else "context_not_ending_with_user")
    if reason:
        report.reject(reason, where)
        return []
    turn = record.get("turn" if fmt == "ours" else "turn_id")
    turn = turn if isinstance(turn, int) and not isinstance(turn, bool) and turn >= 0 else len(history)
    return [Interaction(f"{cid}:{turn}", cid, turn, context, response, followup)]


def _from_record(raw: RawRecord, config: ExtractConfig, report: ExtractReport) -> tuple[list[Interaction], str]:
    """All interactions of one raw record, and the location string used for its problems."""
    if raw.error:
        if raw.error == "unreadable_file":
            log.warning("%s: stopped reading: %s", raw.location, raw.value)
        report.reject(raw.error, raw.location)
        return [], raw.location
    if not isinstance(raw.value, dict):
        report.reject("wrong_type", raw.location)
        return [], raw.location
    cid = record_conversation_id(raw.value, raw.default_id)
    where = f"{raw.location} (conversation {cid})"
    fmt = detect_format(raw.value)
    if fmt is None:
        report.reject("missing_field", where)
        return [], where
    build = _from_interaction if fmt in ("ours", "paper") else _from_conversation
    return build(raw.value, fmt, cid, where, config, report), where


def _read(inputs: list[str], config: ExtractConfig) -> Iterator[RawRecord]:
    n = 0
    for source in inputs:
        for raw in iter_records(source, config.max_line_bytes):
            if config.max_conversations is not None and n >= config.max_conversations:
                return
            n += 1
            yield raw


def extract_interactions(
    inputs: list[str], config: ExtractConfig = DEFAULT_CONFIG
) -> tuple[list[Interaction], ExtractReport]:
    """Read every input and extract interactions. Raises NoInteractionsError when none survive."""
    if isinstance(inputs, str):
        inputs = [inputs]
    report = ExtractReport()
    kept: list[Interaction] = []
    seen: set[str] = set()
    for raw in _read(inputs, config):
        report.conversations_read += 1
        found, where = _from_record(raw, config, report)
        for interaction in found:
            if interaction.id in seen:
                report.reject("duplicate_id", where)
            else:
                seen.add(interaction.id)
                kept.append(interaction)
    report.interactions = len(kept)
    if not kept:
        raise NoInteractionsError(_explain(inputs, report), report)
    return kept, report


def _explain(inputs: list[str], report: ExtractReport) -> str:
    """The NoInteractionsError message: which inputs, the main reasons with examples and fixes."""
    names = ", ".join(i if isinstance(i, str) else label(i) for i in inputs) or "(no inputs)"
    if report.conversations_read == 0:
        return f"No interactions extracted from {names}: no records were read (are the inputs empty?)."
    lines = [f"No interactions extracted from {names} ({report.conversations_read:,} records read). Top reasons:"]
    for reason, n in report.rejected.most_common(3):
        hint = HINTS.get(reason, "see the report's examples")
        lines.append(f"  {reason}: {n:,} (e.g. {(report.examples.get(reason) or ['?'])[0]}); fix: {hint}")
    return "\n".join(lines)


def run_extract(
    inputs: list[str], out: str, report: str | None = None, config: ExtractConfig = DEFAULT_CONFIG
) -> ExtractReport:
    """Extract and write OUT (one interaction per line) and, if asked, REPORT (written even on failure)."""
    try:
        interactions, result = extract_interactions(inputs, config)
    except NoInteractionsError as e:
        if report and e.report is not None:
            write_atomic(report, [json.dumps(e.report.to_json(), indent=2, ensure_ascii=False) + "\n"])
        raise
    write_atomic(out, (json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in interactions))
    if report:
        write_atomic(report, [json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n"])
    log.info("%s", result.summary())
    return result


LOAD_CONFIG = ExtractConfig(
    min_messages=0,
    max_conversation_chars=sys.maxsize,
    max_assistant_chars=None,
    max_user_chars=None,
    max_context_messages=sys.maxsize,
)


def load_interactions(path: str) -> list[Interaction]:
    """Read an OUT.jsonl back through the robust reader, with no length filters; drops are logged."""
    interactions, report = extract_interactions([path], LOAD_CONFIG)
    if report.rejected:
        log.warning("%s: %s", path, report.summary())
    return interactions

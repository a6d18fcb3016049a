"""Read inputs into raw records, and records into normalised messages.

An input name (a file, a folder or an HF dataset) becomes a stream of raw records, each with its location.
Then ``detect_format``, ``record_messages`` and ``normalise_conversation`` turn one record into
``{"role", "content"}`` messages. Every dropped message leaves a reason behind.

Readers never raise on bad *content*: a line that is too large, not UTF-8 or not JSON comes back as a
``RawRecord`` with ``error`` set, so the extractor can count it and move on to the next line. They do raise on a
bad *input name* (a path that does not exist), because silently extracting nothing from a typo is worse.

Supported inputs:

- ``*.jsonl`` / ``*.jsonl.gz``: one record per line, read in binary and decoded per line;
- ``*.json``: a list of records, a dict holding that list under ``"data"`` / ``"conversations"``, or one record;
- ``*.parquet``: one record per row (nested columns come back as dicts and lists);
- a local dataset folder (``save_to_disk`` output, or a folder of data files) or an HF hub dataset name,
  written ``name``, ``name:split`` (default split ``train``) or ``name:config:split``, or given as a
  ``rayuid.config.DataSource`` (name, config, split, revision).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rayuid.config import DataSource

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
DEFAULT_SPLIT = "train"
# Keys that mark a dict as a record rather than a message (used to tell a .json record list from one record).
RECORD_KEYS = ("messages", "conversation", "conversations", "history", "prompt", "context")
# Role names seen in the wild (ShareGPT uses from=human/gpt and sometimes chatgpt/bing/bard) -> our three roles.
ROLES = {
    **dict.fromkeys(("user", "human", "prompter"), "user"),
    **dict.fromkeys(("assistant", "gpt", "chatgpt", "bing", "bard", "bot", "model"), "assistant"),
    "system": "system",
}
TEXT_PART_TYPES = {"text", "input_text", "output_text"}
_MISSING = object()


@dataclass(frozen=True)
class RawRecord:
    """One record as read from an input, or the reason it could not be read.

    ``location`` says where it came from ("file.jsonl:17", "file.json[3]"); ``default_id`` is the conversation id
    to use when the record carries none (``f"{basename}:{line_no}"``).
    """

    location: str
    default_id: str
    value: Any = None
    error: str | None = None


def iter_records(source: str | DataSource, max_line_bytes: int = 10_000_000) -> Iterator[RawRecord]:
    """Yield every record of ``source``, choosing the reader from the suffix or the folder's contents."""
    if isinstance(source, str):
        path = Path(source).expanduser()
        if path.is_file():
            return _iter_file(path, max_line_bytes)
        if path.is_dir():
            return _iter_dataset_dir(path, DataSource(name=source))
    spec = as_source(source)
    if Path(spec.name).expanduser().is_dir():
        return _iter_dataset_dir(Path(spec.name).expanduser(), spec)
    if _looks_like_path(spec.name):
        raise FileNotFoundError(f"input {spec.name!r} does not exist (looked for a file or folder at "
                                f"{Path(spec.name).expanduser().resolve()})")
    return _iter_hub_dataset(spec)


def as_source(source: str | dict | DataSource) -> DataSource:
    """A ``DataSource`` from its mapping or its string form ``NAME``, ``NAME:SPLIT`` or ``NAME:CONFIG:SPLIT``."""
    if isinstance(source, DataSource):
        return source
    if isinstance(source, dict):
        return DataSource.model_validate(source)
    parts = source.split(":")
    if len(parts) == 3 and all(parts) and "/" not in parts[1] + parts[2]:
        return DataSource(name=parts[0], config=parts[1], split=parts[2])
    name, split = split_spec(source)
    return DataSource(name=name, split=split)


def split_spec(source: str) -> tuple[str, str]:
    """Split ``"name:split"`` into its parts; no colon means the ``train`` split."""
    name, sep, split = source.rpartition(":")
    if not sep or not name or "/" in split or not split:
        return source, DEFAULT_SPLIT
    return name, split


def with_revision(source: str, revision: str | None) -> str | DataSource:
    """``rayuid extract --revision``: a hub input read at ``revision`` (a branch, tag or commit); local files and
    folders as they are."""
    if revision is None or Path(source).expanduser().exists():
        return source
    return as_source(source).model_copy(update={"revision": revision})


def label(spec: DataSource) -> str:
    """How records of ``spec`` name where they came from: ``name[:config]:split``."""
    return ":".join(p for p in (spec.name, spec.config, spec.split) if p)


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``org/name`` or ``name``), so it must have been meant as a path."""
    return name.endswith(FILE_SUFFIXES) or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _iter_file(path: Path, max_line_bytes: int) -> Iterator[RawRecord]:
    """Dispatch a local file on its suffix."""
    name = path.name
    if name.endswith(".jsonl"):
        return _iter_jsonl(path, max_line_bytes, open)
    if name.endswith(".jsonl.gz"):
        return _iter_jsonl(path, max_line_bytes, gzip.open)
    if name.endswith(".json"):
        return _iter_json(path)
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    raise ValueError(f"input {str(path)!r} has an unsupported suffix; use one of {', '.join(FILE_SUFFIXES)}")


def _iter_jsonl(path: Path, max_line_bytes: int, opener: Any) -> Iterator[RawRecord]:
    """One record per non-blank line; each line is decoded on its own so one bad line spoils nothing else."""
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in _read_lines(f, max_line_bytes):
                loc, default_id = f"{path.name}:{line_no}", f"{path.name}:{line_no}"
                if line is None:
                    yield RawRecord(loc, default_id, error="line_too_large")
                    continue
                value, error = decode_json_bytes(line, strip_bom=line_no == 1)
                if value is not _BLANK:
                    yield RawRecord(loc, default_id, value, error)
    except (OSError, EOFError) as e:  # truncated or corrupt .gz, unreadable file
        yield RawRecord(f"{path.name}:{line_no + 1}", path.name, error="unreadable_file", value=str(e))


def _read_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line_no, bytes)``; a line longer than the limit yields ``None`` without ever being held whole."""
    line_no = 0
    while line := f.readline(max_line_bytes + 1):
        line_no += 1
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the oversized line in 1 MiB chunks
                line = f.readline(1 << 20)
            yield line_no, None
        else:
            yield line_no, line


_BLANK = object()  # marker for blank lines: not a record, so neither yielded nor counted


def decode_json_bytes(raw: bytes, strip_bom: bool = False) -> tuple[Any, str | None]:
    """Decode one UTF-8 JSON document; return ``(value, None)`` or ``(None, reason)``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if strip_bom:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return _BLANK, None
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None, "invalid_json"


def _iter_json(path: Path) -> Iterator[RawRecord]:
    """A whole-file JSON document: a list of records, ``{"data": [...]}``, or a single record."""
    value, error = decode_json_bytes(path.read_bytes(), strip_bom=True)
    if error or value is _BLANK:
        yield RawRecord(path.name, path.name, error=error or "invalid_json")
        return
    items = _json_items(value)
    if items is None:
        yield RawRecord(path.name, path.name, value)
        return
    for i, item in enumerate(items):
        yield RawRecord(f"{path.name}[{i}]", f"{path.name}:{i}", item)


def _json_items(value: Any) -> list | None:
    """The record list inside a .json document, or ``None`` when the document is one record."""
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("data"), list):
        return value["data"]
    inner = value.get("conversations")
    # {"conversations": [record, ...]} is a container; {"conversations": [{"from","value"}, ...]} is ShareGPT.
    if isinstance(inner, list) and inner and all(isinstance(r, dict) and _looks_like_record(r) for r in inner):
        return inner
    return None


def _looks_like_record(d: dict) -> bool:
    return any(k in d for k in RECORD_KEYS)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    """One record per row, streamed in batches so a large file never sits in memory as Python objects."""
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                yield RawRecord(f"{path.name}[{row}]", f"{path.name}:{row}", value)
                row += 1
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        yield RawRecord(f"{path.name}[{row}]", path.name, error="unreadable_file", value=str(e))


def _iter_dataset_dir(path: Path, spec: DataSource) -> Iterator[RawRecord]:
    """A folder written by ``save_to_disk`` (loaded as is) or a folder of data files (``load_dataset``, which reads
    the configs a README.md ``configs:`` block declares)."""
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ValueError(f"dataset folder {str(path)!r} has no split {spec.split!r}; it has {sorted(ds)}")
            ds = ds[spec.split]
    else:
        ds = datasets.load_dataset(str(path), spec.config, split=spec.split)
    yield from _iter_dataset(ds, label(spec.model_copy(update={"name": path.name})), path.name)


def _iter_hub_dataset(spec: DataSource) -> Iterator[RawRecord]:
    """An HF hub dataset by name; a failure to load names the input, its config and split, and what to set."""
    import datasets

    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, revision=spec.revision)
    except Exception as e:  # the hub raises many unrelated types; re-raise one clear error
        raise FileNotFoundError(
            f"input {label(spec)!r} is not a local file or folder, and loading it as a Hugging Face dataset failed: "
            f"{e}. A dataset with several configs needs one (NAME:CONFIG:SPLIT, or config: in a data mapping); a "
            "script dataset needs revision: refs/convert/parquet."
        ) from e
    yield from _iter_dataset(ds, label(spec), spec.name.replace("/", "_"))


def _iter_dataset(ds: Any, label: str, id_prefix: str) -> Iterator[RawRecord]:
    for i, value in enumerate(ds):
        yield RawRecord(f"{label}[{i}]", f"{id_prefix}:{i}", value)


# --- one record -> normalised messages ---


def normalise_message(message: Any, problems: list[str]) -> dict | None:
    """Return ``{"role", "content"}``, or None after appending the reason the message is dropped."""
    if not isinstance(message, dict):
        problems.append("wrong_type")
        return None
    role = _first(message, ("role", "from"))
    content = _first(message, ("content", "value", "text"))
    if role is _MISSING or content is _MISSING:
        problems.append("missing_field")
        return None
    if not isinstance(role, str):
        problems.append("wrong_type")
        return None
    if role.strip().lower() not in ROLES:
        problems.append("unknown_role")
        return None
    text = _content_text(content, problems)
    if text is None:
        return None
    if not text.strip():
        problems.append("empty_message")
        return None
    return {"role": ROLES[role.strip().lower()], "content": text}


def _first(d: dict, keys: tuple[str, ...]) -> Any:
    return next((d[k] for k in keys if k in d), _MISSING)


def _content_text(content: Any, problems: list[str]) -> str | None:
    """A string, or OpenAI-style parts whose text parts are joined; each non-text part is counted."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        problems.append("wrong_type")
        return None
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") in TEXT_PART_TYPES and "text" in part:
            if not isinstance(part["text"], str):
                problems.append("wrong_type")
                return None
            texts.append(part["text"])
        else:
            problems.append("non_text_part")
    return "\n".join(texts)


def normalise_conversation(messages: list) -> tuple[list[dict], list[str]]:
    """Normalise every message. Returns the kept messages and one reason for each dropped one."""
    kept: list[dict] = []
    problems: list[str] = []
    for message in messages:
        m = normalise_message(message, problems)
        if m is not None and m["role"] == "system" and kept:
            problems.append("system_not_first")
        elif m is not None:
            kept.append(m)
    return kept, problems


def detect_format(record: dict) -> str | None:
    """Which input format a record is in: one of ours/paper/messages/conversation/conversations/history."""
    if "context" in record and ("response" in record or "followup" in record):
        return "ours"
    if "completion" in record or "user_response" in record:
        return "paper"
    return next((k for k in ("messages", "conversation", "conversations", "history") if k in record), None)


def record_conversation_id(record: dict, default: str) -> str:
    """The record's own id (``conversation_id``, ``conversation_hash`` or ``id``), else ``default``."""
    for key in ("conversation_id", "conversation_hash", "id"):
        value = record.get(key)
        if (isinstance(value, str) and value.strip()) or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
    return default


def record_messages(record: dict, fmt: str) -> list | str:
    """The record's message list (MT-Bench-101 user/bot pairs expanded), or ``"wrong_type"``."""
    messages = record[fmt]
    if not isinstance(messages, list):
        return "wrong_type"
    if fmt != "history":
        return messages
    expanded: list = []
    for pair in messages:
        if not isinstance(pair, dict):
            expanded.append(pair)
            continue
        for key, role in (("user", "user"), ("bot", "assistant")):
            expanded.append({"role": role, "content": pair[key]} if key in pair else {"role": role})
    return expanded

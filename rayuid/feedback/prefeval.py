"""PrefEval stated preferences (Zhao et al., ICLR 2025) as simulated users and prompt sources.

The data is PrefEval's ``explicit_preference/<topic>.json``: records ``{preference, question, explanation}``, kept
under ``../shared/data/external/prefeval_explicit`` here (or wherever ``RAYUID_PREFEVAL_DIR`` points; on a cluster
set it in the job's runtime env). Two names reach it:

- persona ``prefeval:<topic>/<i>``: a user whose profile is record i's stated preference (LLM simulator and LLM
  judge only: a free-text preference has no rule check);
- prompt source ``prefeval:<topic>``: the topic's questions, each written to tempt a violation of some preference
  of that topic (e.g. restaurant tips for a user who must avoid gluten).
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

PREFIX = "prefeval:"
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "external" / "prefeval_explicit"


def data_dir() -> Path:
    return Path(os.environ.get("RAYUID_PREFEVAL_DIR", DEFAULT_DIR))


@lru_cache(maxsize=64)
def load_topic(topic: str) -> tuple[dict, ...]:
    """The topic's records in PrefEval's own order (so index i is PrefEval's record i)."""
    if not re.fullmatch(r"[\w-]+", topic):
        raise ValueError(f"PrefEval topic {topic!r} must be a file stem such as travel_restaurant")
    path = data_dir() / f"{topic}.json"
    if not path.exists():
        known = sorted(p.stem for p in data_dir().glob("*.json")) if data_dir().is_dir() else []
        raise ValueError(f"no PrefEval topic {topic!r} in {data_dir()} (set RAYUID_PREFEVAL_DIR to the folder of "
                         f"explicit_preference/*.json); topics there: {', '.join(known) or 'none'}")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) and r.get("preference") and r.get("question")
                                                 for r in records):
        raise ValueError(f"{path} is not a PrefEval explicit-preference file (a list of {{preference, question}})")
    return tuple(records)


def stated_preference(name: str) -> str:
    """``prefeval:<topic>/<i>`` → the preference text of record i of that topic."""
    topic, _, index = name[len(PREFIX):].partition("/")
    records = load_topic(topic)
    if not index.isdigit() or int(index) >= len(records):
        raise ValueError(f"persona {name!r}: write prefeval:<topic>/<i> with 0 <= i < {len(records)}")
    return records[int(index)]["preference"]


def profile(name: str) -> str:
    """The user-model / judge profile for a PrefEval persona, in our words around the stated preference."""
    return (f"I have told the assistant this about myself: \"{stated_preference(name)}\" I expect every answer to "
            "respect it without my having to repeat it.")


def questions(source: str) -> list[tuple[str, str]]:
    """``prefeval:<topic>`` → (id, question) pairs of that topic."""
    topic = source[len(PREFIX):]
    return [(f"{topic}-{i}", r["question"]) for i, r in enumerate(load_topic(topic))]

"""Prompts for online SDPO: where they come from and which ones each step uses.

The order is a pure function of (seed, step), so a retried or resumed step sees exactly the same prompts, and every
sampled reply gets an interaction id ``s{step}-{slot}`` that is the same on every retry — what the ledger relies on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from rayuid.data.extract import extract_interactions
from rayuid.data.readers import iter_records
from rayuid.feedback import prefeval
from rayuid.seeds import epoch_seed

SHIPPED = "rayuid:prompts"


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict]  # OpenAI-style context ending with a user turn


def shipped_prompts() -> list[Prompt]:
    path = resources.files("rayuid") / "data" / "prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Prompt(r["id"], [{"role": "user", "content": r["prompt"]}]) for r in rows]


def _field(record: dict, dotted: str):
    value = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def text_prompts(source, field: str, max_chars: int) -> list[Prompt]:
    """Records carrying a plain-text prompt at ``field`` (dotted, e.g. ``info.post``); de-duplicated.

    Multi-turn HelpSteer2 prompts (``<extra_id_N>`` markers), empty and over-long texts are skipped.
    """
    seen: set[str] = set()
    out: list[Prompt] = []
    for rec in iter_records(source):
        text = _field(rec.value, field) if rec.error is None and isinstance(rec.value, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > max_chars or "<extra_id_" in text:
            continue
        key = " ".join(text.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(Prompt(rec.location, [{"role": "user", "content": text.strip()}]))
    return out


def load_prompts(sources: list, system_prompt: str | None = None, field: str = "prompt",
                 max_chars: int = 4096) -> list[Prompt]:
    """Shipped prompts; records with a text ``field`` (HelpSteer2 ``prompt``, TL;DR ``info.post``); or else the
    contexts x of the interactions in chat logs / interaction files."""
    prompts: list[Prompt] = []
    for source in sources:
        if source == SHIPPED:
            prompts += shipped_prompts()
            continue
        if isinstance(source, str) and source.startswith(prefeval.PREFIX):
            prompts += [Prompt(pid, [{"role": "user", "content": q}]) for pid, q in prefeval.questions(source)]
            continue
        found = text_prompts(source, field, max_chars)
        if not found:
            interactions, _ = extract_interactions([source])
            found = [Prompt(it.id, list(it.context)) for it in interactions]
        prompts += found
    if not prompts:
        raise ValueError(f"no prompts found in {sources}: give chat logs, interaction files, records with a "
                         f"'{field}' text field (online.prompt_field), or 'rayuid:prompts'")
    if system_prompt:
        prompts = [Prompt(p.id, [{"role": "system", "content": system_prompt}]
                          + [m for m in p.messages if m["role"] != "system"]) for p in prompts]
    return prompts


def with_system_prompt(prompt: Prompt, system: str) -> Prompt:
    """The in-context oracle's view of a prompt: the persona's profile as (or after) the system prompt."""
    rest = [m for m in prompt.messages if m["role"] != "system"]
    old = [m["content"] for m in prompt.messages if m["role"] == "system"]
    return Prompt(prompt.id, [{"role": "system", "content": "\n\n".join([*old, system])}] + rest)


def split_heldout(prompts: list[Prompt], heldout: int) -> tuple[list[Prompt], list[Prompt]]:
    """The last ``heldout`` prompts are kept for evaluation and never trained on."""
    if heldout >= len(prompts):
        raise ValueError(f"held-out size {heldout} leaves no training prompts (have {len(prompts)})")
    return (prompts[:-heldout], prompts[-heldout:]) if heldout else (prompts, [])


def prompts_for_step(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of ``step``: consecutive slices of seeded per-epoch permutations."""
    import torch

    start = step * per_step
    indices: list[int] = []
    while len(indices) < per_step:
        pos = start + len(indices)
        epoch, offset = divmod(pos, num_prompts)
        perm = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
        take = min(per_step - len(indices), num_prompts - offset)
        indices += perm[offset: offset + take]
    return indices

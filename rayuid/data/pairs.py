"""Logged interactions → ScoringPairs (both contexts tokenised once), in a seeded per-epoch order."""

from __future__ import annotations

from importlib import resources

import torch
from tqdm.auto import tqdm

from rayuid.config import TrainConfig
from rayuid.data.extract import extract_interactions
from rayuid.data.templates import TemplateOptions, build_pair
from rayuid.seeds import epoch_seed

SAMPLE_DATA = "rayuid:sample"


def data_paths(paths: list[str]) -> list[str]:
    """``rayuid:sample`` names the conversations shipped inside the package."""
    sample = str(resources.files("rayuid") / "data" / "sample_conversations.jsonl")
    return [sample if p == SAMPLE_DATA else p for p in paths]


def load_pairs(cfg: TrainConfig, tokenizer) -> tuple[list, dict]:
    """Interactions → ScoringPairs (both contexts tokenised once) and the extraction report."""
    interactions, report = extract_interactions(data_paths(cfg.data.paths), cfg.data.extract)
    if cfg.data.max_interactions is not None:
        interactions = interactions[: cfg.data.max_interactions]
    t = cfg.template
    options = TemplateOptions(t.hindsight, t.max_prompt_tokens, t.max_response_tokens, t.append_eos)
    pairs = [build_pair(tokenizer, it, options) for it in tqdm(interactions, desc="tokenise", leave=False)]
    return pairs, report.to_json()


def example_order(num_examples: int, epochs: int, seed: int) -> list[int]:
    """Concatenated per-epoch permutations, each seeded by (seed, epoch)."""
    order: list[int] = []
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order += torch.randperm(num_examples, generator=gen).tolist()
    return order

"""What a Ray run trains on: online, the prompt pool (and its held-out part); offline, the tokenised interactions
in their seeded order. Also the run's ``samples.jsonl``, the record of every online interaction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rayuid.config import TrainConfig
from rayuid.data.pairs import example_order, load_pairs
from rayuid.data.prompts import Prompt, load_prompts, split_heldout
from rayuid.data.templates import ScoringPair, TemplateOptions
from rayuid.records.storage import RunDir


@dataclass
class RunSource:
    """Online: the prompt pool. Offline: the tokenised interactions and their seeded order."""

    mode: str
    total_steps: int
    options: TemplateOptions
    records: RunDir
    prompts: list[Prompt] = field(default_factory=list)
    heldout: list[Prompt] = field(default_factory=list)
    pairs: list[ScoringPair] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    batch_size: int = 0

    @property
    def run_dir(self) -> Path:
        """The driver's working copy of the run's records (``RunDir.local``)."""
        return self.records.local

    def offline_batch(self, step: int) -> tuple[list[ScoringPair], list[str]]:
        """The step's pairs and their ledger ids (``id@e{epoch}``: a second epoch is not a repeat)."""
        lo = step * self.batch_size
        idx = self.order[lo: lo + self.batch_size]
        epochs = [(lo + k) // len(self.pairs) for k in range(len(idx))]
        return [self.pairs[i] for i in idx], [f"{self.pairs[i].id}@e{e}" for i, e in zip(idx, epochs)]

    def truncate_samples(self, last_step: int) -> None:
        """Drop sample records of steps after ``last_step`` (they are redone after a restore)."""
        path = self.run_dir / "samples.jsonl"
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write_samples(self, step: int, samples: list, followups: list[str], versions: list[int]) -> None:
        """Every online interaction (prompt, reply, follow-up) with the versions that generated and scored it."""
        with (self.run_dir / "samples.jsonl").open("a") as fh:
            for s, followup, v in zip(samples, followups, versions, strict=True):
                record = {"step": step, "id": s.id, "prompt_id": s.prompt.id,
                          "prompt": s.prompt.messages[-1]["content"], "response": s.generation.text,
                          "followup": followup, "gen_version": s.generation.version, "score_version": v}
                if s.user is not None:
                    record["user"] = s.user
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_source(cfg: TrainConfig, tokenizer, records: RunDir) -> RunSource:
    t = cfg.template
    options = TemplateOptions(t.hindsight, t.max_prompt_tokens, t.max_response_tokens, t.append_eos)
    if cfg.online is not None:
        o = cfg.online
        prompts, heldout = split_heldout(load_prompts(o.prompts, o.system_prompt, o.prompt_field, o.max_prompt_chars),
                                         o.heldout_prompts)
        return RunSource("online", cfg.online.steps, options, records, prompts=prompts, heldout=heldout)
    pairs, report = load_pairs(cfg, tokenizer)
    (records.local / "extract_report.json").write_text(json.dumps(report, indent=2))
    batch = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * cfg.ray.learners
    order = example_order(len(pairs), cfg.optim.epochs, cfg.seed)
    total = min(math.ceil(len(order) / batch), cfg.optim.max_steps or 10**12)
    return RunSource("offline", total, options, records, pairs=pairs, order=order, batch_size=batch)

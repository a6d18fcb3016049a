"""What a Ray run trains on, where its checkpoints live, and its summary (plain functions for the driver)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rayuid import checkpoint as ckpt
from rayuid.config import TrainConfig
from rayuid.fsdp_checkpoint import EXTRA_FILE
from rayuid.ledger import Ledger
from rayuid.plots import plot_metrics
from rayuid.prompts import Prompt, load_prompts, split_heldout
from rayuid.templates import ScoringPair, TemplateOptions
from rayuid.trainer import example_order, load_pairs

DRIVER_STATE = EXTRA_FILE  # written by the learners' checkpoint, last, inside its atomic rename


@dataclass
class RunSource:
    """Online: the prompt pool. Offline: the tokenised interactions and their seeded order."""

    mode: str
    total_steps: int
    options: TemplateOptions
    run_dir: Path
    prompts: list[Prompt] = field(default_factory=list)
    heldout: list[Prompt] = field(default_factory=list)
    pairs: list[ScoringPair] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    batch_size: int = 0

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

    def write_samples(self, step: int, samples: list, versions: list[int]) -> None:
        """Every online interaction with its versions, to ``samples.jsonl``."""
        with (self.run_dir / "samples.jsonl").open("a") as fh:
            for s, v in zip(samples, versions):
                record = {"step": step, "id": s.id, "prompt_id": s.prompt.id,
                          "prompt": s.prompt.messages[-1]["content"], "response": s.generation.text,
                          "followup": s.followup, "gen_version": s.generation.version, "score_version": v}
                if s.user is not None:
                    record["user"] = s.user
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_source(cfg: TrainConfig, tokenizer) -> RunSource:
    t = cfg.template
    options = TemplateOptions(t.hindsight, t.max_prompt_tokens, t.max_response_tokens, t.append_eos)
    run_dir = Path(cfg.run_dir)
    if cfg.online is not None:
        o = cfg.online
        prompts, heldout = split_heldout(load_prompts(o.prompts, o.system_prompt, o.prompt_field, o.max_prompt_chars),
                                         o.heldout_prompts)
        return RunSource("online", cfg.online.steps, options, run_dir, prompts=prompts, heldout=heldout)
    pairs, report = load_pairs(cfg, tokenizer)
    (run_dir / "extract_report.json").write_text(json.dumps(report, indent=2))
    batch = cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * cfg.ray.learners
    order = example_order(len(pairs), cfg.optim.epochs, cfg.seed)
    total = min(math.ceil(len(order) / batch), cfg.optim.max_steps or 10**12)
    return RunSource("offline", total, options, run_dir, pairs=pairs, order=order, batch_size=batch)


def launch(cfg: TrainConfig) -> tuple[object, RunSource, object]:
    """Join (or start) Ray, prepare the run dir, load the tokenizer and the data, start every actor."""
    from rayuid.actors import spawn
    from rayuid.config import dump_config
    from rayuid.models import load_tokenizer, resolve_model

    spawn.connect(cfg.ray.address, cfg.ray.num_cpus)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    tokenizer = load_tokenizer(resolve_model(cfg.model.name))
    source = build_source(cfg, tokenizer)
    return tokenizer, source, spawn.build_system(cfg, source.total_steps)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint the learners finished (they write the driver state last, inside the atomic rename)."""
    return ckpt.latest_checkpoint(run_dir, marker=DRIVER_STATE)


def save_checkpoint(cfg: TrainConfig, system, step: int, version: int, ledger: Ledger) -> Path:
    """All learner ranks write their shards; the driver state (step, version, ledger) rides along."""
    path = ckpt.step_dir(cfg.run_dir, step).absolute()
    extra = {"step": step, "version": version, "ledger": ledger.to_json()}
    ray.get([l.save_checkpoint.remote(str(path.resolve()), extra) for l in system.learners],
            timeout=cfg.ray.call_timeout_s)  # the learners also write `extra` as driver_state.json
    ckpt.prune_checkpoints(cfg.run_dir, cfg.checkpoint.keep_last, marker=DRIVER_STATE)
    return path


def finish(cfg: TrainConfig, records: list[dict], ledger: Ledger, source: RunSource, precision: dict) -> dict:
    """``summary.json``: counts, losses, seconds per phase, and each role's decided precision."""
    run_dir = Path(cfg.run_dir)
    counts = ledger.counts()
    phases = ("generate_s", "simulate_s", "score_s", "learn_s", "sync_s")
    summary = dict(
        run_dir=str(run_dir), mode=source.mode, steps_done=len(records), total_steps=source.total_steps,
        interactions_trained=sum(counts.values()), interactions_trained_twice=sum(1 for n in counts.values() if n > 1),
        first_loss=records[0]["loss"] if records else None, final_loss=records[-1]["loss"] if records else None,
        final_version=records[-1]["version"] if records else 0,
        seconds_per_phase={p: sum(r.get(p, 0.0) for r in records) for p in phases},
        interactions_per_s=sum(r["interactions"] for r in records) / max(sum(r["seconds"] for r in records), 1e-9),
        checkpoint=str(latest_checkpoint(run_dir) or ""), metrics=str(run_dir / "metrics.jsonl"),
        plot=str(plot_metrics(records, run_dir / "metrics.png", ("loss", "adv_mean", "mean_reply_words")))
        if records else None,
        precision=precision,
    )
    (run_dir / "ledger.json").write_text(json.dumps(ledger.to_json()))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

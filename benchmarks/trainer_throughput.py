"""Offline trainer throughput on SmolLM2-135M-Instruct here, and the share of step time in the teacher's forward.

    python benchmarks/trainer_throughput.py [--steps 6] [--micro-batch 4] [--out runs/bench/trainer_throughput.json]

The teacher's no-grad forward on x⊕o is the part the Ray system moves into vLLM (prompt_logprobs); its share of the
step time is what that move can save on the learner.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from rayuid.config import load_config
from rayuid.offline.trainer import train

JOB = Path(__file__).resolve().parents[1] / "jobs" / "offline_smollm2_sample.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="runs/bench/trainer_throughput.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(JOB, [f"run_dir={tmp}", f"optim.max_steps={args.steps}", "optim.grad_accum_steps=1",
                                f"optim.micro_batch_size={args.micro_batch}", f"model.dtype={args.dtype}",
                                "checkpoint.save_final=false", "checkpoint.every_steps=null"])
        train(cfg)
        records = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records  # step 1 includes one-off warm-up
    seconds = sum(r["seconds"] for r in timed)
    result = {
        "model": cfg.model.name, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "micro_batch": args.micro_batch, "steps_timed": len(timed),
        "tokens_per_s": sum(r["tokens_processed"] for r in timed) / seconds,
        "interactions_per_s": sum(r["interactions"] for r in timed) / seconds,
        "seconds_per_step": seconds / len(timed),
        "teacher_forward_share": sum(r["teacher_s"] for r in timed) / seconds,
        "student_fwd_bwd_share": sum(r["student_s"] for r in timed) / seconds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")


if __name__ == "__main__":
    main()

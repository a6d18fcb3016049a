"""What holds the demo's gain? The README job under variants of teacher, LoRA vs full, learning rate and batch.

    python benchmarks/demo_ablation.py [--variants full_live lora_live_2e-4 ...] [--out runs/ablation]

Each variant is the README's main job (``jobs/online_smollm2_concise.yaml``) with a few overrides, run to the end
(a finished variant is not rerun); the held-out curves (adherence, win rate vs base, mean words) of all variants are
drawn on one figure, ``OUT/ablation.png``, and tabulated in ``OUT/ablation.json`` with the share of final replies
that open with an apology (the hindsight teacher's favourite shortcut; a quality guard).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "online_smollm2_concise.yaml"
LIVE = ["teacher.weights=live", "ray.teacher_in=vllm"]
LEARNER = ["ray.teacher_in=learner"]
FULL = ["model.lora=null", "online.steps=16"]
LORA = ["model.lora={r: 16, alpha: 32}", "ray.vllm.max_lora_rank=16", "online.steps=16", *LEARNER]
VARIANTS: dict[str, list[str]] = {   # each pins what it changes from the job, so the job's defaults may move on
    "full_live_1e-5": [*FULL, *LIVE, "optim.lr=1e-5"],
    "full_ema_1e-5": [*FULL, *LEARNER, "optim.lr=1e-5", "teacher.weights=ema"],
    "full_frozen_1e-5": [*FULL, *LEARNER, "optim.lr=1e-5", "teacher.weights=frozen"],
    "full_live_1e-5_batch16": [*FULL, *LIVE, "optim.lr=1e-5", "online.prompts_per_step=16", "online.steps=8",
                               "online.eval_every=2", "optim.grad_accum_steps=4"],
    "lora_live_1e-4": [*LORA, "teacher.weights=live", "optim.lr=1e-4"],
    "lora_live_2e-4": [*LORA, "teacher.weights=live", "optim.lr=2e-4", "online.steps=12"],  # collapsed by 96
    "lora_ema_2e-4": [*LORA, "teacher.weights=ema", "optim.lr=2e-4"],
    "full_ema_2e-5_default": ["model.lora=null"],   # the job as shipped: EMA teacher, lr 2e-5, 160 interactions
}


def run_variant(name: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / name
    if not (run_dir / "eval.json").exists():
        cmd = [sys.executable, "-m", "rayuid.cli", "train", str(JOB), f"run_dir={run_dir}", *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
    from rayuid.feedback.judges import apologizes

    evaluation = json.loads((run_dir / "eval.json").read_text())
    after = evaluation["samples"]["after"]
    return {"overrides": overrides, "points": evaluation["points"], "samples": after[:3],
            "final_apology_rate": sum(map(apologizes, after)) / len(after)}


def plot(results: dict, path: Path) -> None:
    from rayuid.records.plots import plt

    panels = [("adherence", "held-out adherence"), ("win_rate_vs_base", "win rate vs base"),
              ("mean_words", "mean reply words")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, res in results.items():
        xs = [p["interactions"] for p in res["points"]]
        for ax, (key, title) in zip(axes, panels):
            ys = [p[key]["rate"] if isinstance(p[key], dict) else p[key] for p in res["points"]]
            ax.plot(xs, ys, marker="o", ms=3, label=name)
            ax.set_title(title)
            ax.set_xlabel("training interactions")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run_variant(name, VARIANTS[name], out.absolute()) for name in args.variants}
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "ablation.png")
    print(f"{'variant':<26}{'adherence':>10}{'win rate':>10}{'words':>8}{'apology':>9}   (last point)")
    for name, res in results.items():
        last = res["points"][-1]
        print(f"{name:<26}{last['adherence']:>10.2f}{last['win_rate_vs_base']['rate']:>10.2f}"
              f"{last['mean_words']:>8.1f}{res['final_apology_rate']:>9.2f}")
    print(f"figure: {out / 'ablation.png'}")


if __name__ == "__main__":
    main()

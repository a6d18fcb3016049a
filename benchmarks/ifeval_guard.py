"""Capability guard: IFEval prompt-level strict/loose accuracy of a model before and after adaptation, offline.

    python benchmarks/ifeval_guard.py --models HuggingFaceTB/SmolLM2-135M-Instruct runs/X/checkpoints/step-N/hf \
        runs/Y/adapters/<user>/v000016 [--limit 20 --seed 0 --max-tokens 256] [--out runs/bench/ifeval.json]

A PEFT adapter folder (a per-user adapter, or a LoRA run's checkpoint) is merged into its base model first.

Greedy replies from a vLLM engine per model; the fixed seeded subsample of ../shared/data/external/ifeval is
scored with the official IFEval checkers (``rayuid.feedback.ifeval``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "external" / "ifeval" / "input_data.jsonl"


def merged(adapter: Path) -> str:
    """A full HF folder: the adapter merged into the base model named in its adapter_config.json."""
    import tempfile

    from peft import PeftModel

    from rayuid.sdpo.models import load_causal_lm, load_tokenizer, resolve_model

    base = resolve_model(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    out = Path(tempfile.mkdtemp(prefix="rayuid-merged-"))
    PeftModel.from_pretrained(load_causal_lm(base), str(adapter)).merge_and_unload().save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    return str(out)


def evaluate(model: str, path: Path, limit: int, seed: int, max_tokens: int) -> dict:
    from rayuid.config import EngineSettings
    from rayuid.feedback.ifeval import run_ifeval
    from rayuid.sdpo.models import resolve_model
    from rayuid.system.engine import VllmEngine

    folder = merged(Path(model)) if (Path(model) / "adapter_config.json").exists() else resolve_model(model)
    engine = VllmEngine(folder, EngineSettings(dtype="auto", max_model_len=2048))
    result = run_ifeval(lambda convs: engine.chat(convs, max_tokens, 0.0), str(path), limit, seed)
    return {k: v for k, v in result.items() if k != "per_prompt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", default="runs/bench/ifeval.json")
    args = parser.parse_args()
    results = {m: evaluate(m, Path(args.data), args.limit, args.seed, args.max_tokens) for m in args.models}
    for model, r in results.items():
        print(f"{model}: prompt strict {r['prompt_strict']:.3f}  prompt loose {r['prompt_loose']:.3f}  (n={r['n']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

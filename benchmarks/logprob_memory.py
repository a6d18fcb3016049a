"""Peak memory of per-token log-probs: naive full-vocab log_softmax vs chunked `token_logprobs`.

    python benchmarks/logprob_memory.py --backward --out logprob_memory.json

Each variant runs in a fresh subprocess, because a process's peak RSS
(`ru_maxrss`) never goes down: measuring two variants in one process would
report the larger peak for both. The number reported is the rise of the peak
above the level reached after allocating the inputs, i.e. the extra memory the
log-prob computation needs. On CUDA, `torch.cuda.max_memory_allocated` is used.
With --backward the parameter gradients (hidden.grad and weight.grad, V*H
floats) are part of both variants' peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from rayuid.sdpo.logprobs import token_logprobs

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backward", action="store_true", help="also measure forward+backward")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--variant", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("forward", "backward"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_bytes(device: torch.device) -> int:
    """Process peak so far: CUDA allocator peak, or max RSS (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(args: argparse.Namespace) -> list[dict]:
    """Child process: allocate inputs, record the baseline peak, run one variant, report the rise.

    With --backward the forward row is measured with grad enabled (what training does);
    the naive forward peak is two (T, V) fp32 tensors either way.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    grad = args.mode == "backward"
    torch.manual_seed(0)
    hidden = torch.randn(args.positions, args.hidden, device=device, dtype=dtype).requires_grad_(grad)
    weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype).mul_(0.02).requires_grad_(grad)
    targets = torch.randint(0, args.vocab, (args.positions,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = _peak_bytes(device)
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        if args.variant == "naive":
            lp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            lp = token_logprobs(hidden, weight, targets, chunk_size=args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows = [{"variant": args.variant, "mode": "forward", "device": str(device),
             "peak_increase_bytes": _peak_bytes(device) - baseline, "seconds": time.perf_counter() - start,
             "checksum": float(lp.detach().double().sum())}]
    if grad:  # the peak only grows, so this is the forward+backward peak
        lp.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({**rows[0], "mode": "forward+backward", "seconds": time.perf_counter() - start,
                     "peak_increase_bytes": _peak_bytes(device) - baseline})
    return rows


def run_child(args: argparse.Namespace, variant: str, mode: str) -> list[dict]:
    """Re-invoke this script for one measurement and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--vocab", str(args.vocab),
           "--positions", str(args.positions), "--hidden", str(args.hidden),
           "--chunk-size", str(args.chunk_size), "--dtype", args.dtype, "--variant", variant, "--mode", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], full_bytes: int) -> None:
    """One row per (mode, variant) with the ratio to the naive row of the same mode."""
    naive = {r["mode"]: r["peak_increase_bytes"] for r in results if r["variant"] == "naive"}
    print(f"full (T, V) fp32 tensor: {full_bytes / MIB:,.0f} MiB")
    print(f"{'mode':<16} {'variant':<8} {'peak +MiB':>10} {'x (T,V)':>8} {'vs naive':>9} {'sec':>7}")
    for r in results:
        peak = r["peak_increase_bytes"]
        print(f"{r['mode']:<16} {r['variant']:<8} {peak / MIB:>10,.0f} {peak / full_bytes:>8.2f} "
              f"{peak / naive[r['mode']]:>9.1%} {r['seconds']:>7.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(measure_one(args)))
        return
    mode = "backward" if args.backward else "forward"
    naive, chunked = (run_child(args, v, mode) for v in ("naive", "chunked"))
    sums = (naive[0]["checksum"], chunked[0]["checksum"])  # both variants must compute the same thing
    assert abs(sums[0] - sums[1]) <= 1e-3 * abs(sums[0]), f"checksums differ: {sums}"
    results = [row for pair in zip(naive, chunked) for row in pair]
    full_bytes = args.positions * args.vocab * 4
    print_table(results, full_bytes)
    if args.out is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("variant", "mode", "out")}
        payload = {"config": config, "full_tv_fp32_bytes": full_bytes, "results": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

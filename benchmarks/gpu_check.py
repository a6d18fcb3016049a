"""GPU checks that need nothing but torch (the lent GPU machine has no vLLM or Ray).

    python benchmarks/gpu_check.py [--out runs/bench/gpu_check.json] [--steps 5] [--tiny --device cpu]

(a) learner: one FSDP2 rank (NCCL) per GPU in bf16 on a randomly initialised Qwen3-0.6B-shaped decoder (28
    layers, hidden 1024, 16 query / 8 KV heads of 128, SwiGLU 3072, vocab 151,936), the sampled-token SDPO loss
    with teacher log-probs given (as from vLLM) — rayuid's own ``token_logprobs`` and ``sampled_token_loss`` — then
    AdamW:
    tokens/s and model-FLOPs utilisation (6 × params + 12 × layers × hidden × seq FLOPs per token, over the device's
    dense bf16 peak; target ≥ 40%).
(b) transport: the packed-bucket broadcast the learner-side sender does (one flat buffer in buckets): ≥ 2 GPUs —
    NCCL broadcast from rank 0 to rank 1; one GPU — a second process reading the buffer through CUDA IPC (the
    ``ipc`` case: learner and engine on one GPU); both next to one device memcpy of the same bytes.
(c) publish source: what a one-rank GPU learner does per version before vLLM's NCCL/IPC sender broadcasts — pack
    the host copy for restarts, then the fp32 model's own tensors cast to bf16 on the device with their Digest —
    next to the host round trip it replaced (pack, views back to the device, Digest); the digests must agree.
``--tiny --device cpu`` runs the same code on gloo with a 2-layer model (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from rayuid.sdpo.logprobs import token_logprobs
from rayuid.sdpo.losses import sampled_token_loss

QWEN3_0_6B = dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, inter=3072, vocab=151_936)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, vocab=512)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


class Block(nn.Module):
    """One Qwen3-style decoder layer: RMSNorm → GQA attention (q/k RMSNorm) → RMSNorm → SwiGLU."""

    def __init__(self, s: dict):
        super().__init__()
        h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
        self.s = s
        self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv = nn.Linear(h, q + 2 * kv, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(s["head_dim"]), nn.RMSNorm(s["head_dim"])
        self.o = nn.Linear(q, h, bias=False)
        self.up = nn.Linear(h, 2 * s["inter"], bias=False)
        self.down = nn.Linear(s["inter"], h, bias=False)

    def forward(self, x):
        s, (b, t, _) = self.s, x.shape
        q, k, v = self.qkv(self.norm1(x)).split([s["heads"] * s["head_dim"]] + [s["kv_heads"] * s["head_dim"]] * 2, -1)
        q = self.q_norm(q.view(b, t, s["heads"], s["head_dim"])).transpose(1, 2)
        k = self.k_norm(k.view(b, t, s["kv_heads"], s["head_dim"])).transpose(1, 2)
        v = v.view(b, t, s["kv_heads"], s["head_dim"]).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, s: dict):
        super().__init__()
        self.embed = nn.Embedding(s["vocab"], s["hidden"])
        self.layers = nn.ModuleList(Block(s) for _ in range(s["layers"]))
        self.norm = nn.RMSNorm(s["hidden"])

    def forward(self, ids, targets):
        """log π(targets | ids) at the last ``targets.shape[1]`` positions (tied head, rayuid's chunked kernel;
        inside forward, where FSDP2 has the root's parameters unsharded)."""
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        hidden = self.norm(x)[:, -targets.shape[1]:]
        return token_logprobs(hidden, self.embed.weight, targets).clone()  # not a view: FSDP2's backward hook


def _init(rank: int, world: int, device: str, port: int) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def learner_step(rank: int, world: int, args, port: int, out: dict) -> None:
    """(a): FSDP2 over ``world`` ranks; tokens/s and MFU of the SDPO step, best of ``args.steps`` after a warm-up."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = _init(rank, world, args.device, port)
    shape = TINY if args.tiny else QWEN3_0_6B
    torch.manual_seed(0)
    model = Decoder(shape).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if args.device == "cuda" else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b, t, resp = args.batch, args.seq, args.seq // 2
    times = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, shape["vocab"], (b, t), device=device)
        teacher_lp = -torch.rand(b, resp, device=device)   # log-probs handed in, as from vLLM's prefill
        sync(device)
        t0 = time.perf_counter()
        student_lp = model(ids[:, :-1], ids[:, -resp:])
        loss, _ = sampled_token_loss(student_lp, teacher_lp, torch.ones(b, resp, dtype=torch.bool, device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        best = min(times)
        tokens = b * (t - 1) * world
        flops = tokens * (6 * n_params + 12 * shape["layers"] * shape["hidden"] * t)
        peak = _peak_tflops(args)
        out.update(params=n_params, ranks=world, tokens_per_step=tokens, step_s=best, tokens_per_s=tokens / best,
                   mfu=flops / best / (peak * world * 1e12) if peak else None, peak_tflops_per_device=peak)
    dist.destroy_process_group()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def broadcast_ranks(rank: int, world: int, args, port: int, out: dict) -> None:
    """(b) with ≥ 2 devices (or gloo on CPU): rank 0 broadcasts one flat buffer in buckets to rank 1."""
    device = _init(rank, world, args.device, port)
    buf = torch.empty(args.buffer_mib << 20, dtype=torch.uint8, device=device)
    times = []
    for _ in range(args.steps + 1):
        sync(device)
        t0 = time.perf_counter()
        for lo in range(0, buf.numel(), args.bucket_mib << 20):
            dist.broadcast(buf[lo: lo + (args.bucket_mib << 20)], 0)
        sync(device)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.update(mode="nccl broadcast" if args.device == "cuda" else "gloo broadcast", seconds=min(times[1:]))
    dist.destroy_process_group()


def _ipc_reader(queue, done, steps: int) -> None:
    buf = queue.get()                       # a CUDA tensor shared through IPC: no copy on the way
    mine = torch.empty_like(buf)
    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mine.copy_(buf)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    done.put(min(times[1:]))


def broadcast_ipc(args) -> dict:
    """(b) with one GPU: a second process copies the learner's buffer through CUDA IPC."""
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    buf = torch.randint(0, 255, (args.buffer_mib << 20,), dtype=torch.uint8, device="cuda")
    reader = ctx.Process(target=_ipc_reader, args=(queue, done, args.steps))
    reader.start()
    queue.put(buf)
    seconds = done.get(timeout=600)
    reader.join()
    return {"mode": "cuda ipc, second process", "seconds": seconds}


def memcpy_seconds(args) -> float:
    device = torch.device(args.device)
    src = torch.randint(0, 255, (args.buffer_mib << 20,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(args.steps + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def publish_source(args) -> dict:
    """(c): seconds per version of what the learner does now (pack the host copy, then feed the sender the model's
    tensors, cast on the device one at a time, Digest as they go) and of what it did before (pack, then the
    packed views back to the device, Digest); best of ``args.steps``. The sender's own broadcast is (b)."""
    try:
        from rayuid.sdpo.weights import FlatPacker, distinct_tensors, unflatten
        from rayuid.system.transport import Digest, fingerprint
    except ImportError as err:  # the lent machine has torch only: xxhash and numpy travel as carried wheels
        return {"skipped": f"needs {err.name}: pip install {err.name} (or carry its wheel)"}
    device = torch.device(args.device)
    state = Decoder(TINY if args.tiny else QWEN3_0_6B).to(device).state_dict()
    packer = FlatPacker()

    def device_path() -> str:
        packer.pack(state, 1, dtype=torch.bfloat16)
        digest = Digest()  # what transport.Source does while vLLM's sender reads it
        for name, tensor in distinct_tensors(state):
            digest.update(name, tensor.to(torch.bfloat16))
        return digest.hexdigest()

    def host_round_trip() -> str:
        blob = packer.pack(state, 1, dtype=torch.bfloat16)
        return fingerprint([(n, t.to(device)) for n, t in unflatten(blob, distinct=True).items()])

    out: dict = {"bytes": sum(t.numel() * 2 for t in state.values())}
    digests = []
    for name, fn in (("device_path", device_path), ("host_round_trip", host_round_trip)):
        times = []
        for _ in range(args.steps + 1):
            sync(device)
            t0 = time.perf_counter()
            digest = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = min(times[1:])
        digests.append(digest)
    return {**out, "same_digest": digests[0] == digests[1],
            "host_over_device": out["host_round_trip_s"] / out["device_path_s"]}


def _spawn(fn, world: int, args) -> dict:
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(fn, args=(world, args, port, out), nprocs=world, join=True)
        return dict(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/gpu_check.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (the CPU test of this script)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--buffer-mib", type=int, default=1024, help="bytes moved by (b): ~a 0.5B model in bf16")
    parser.add_argument("--bucket-mib", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per device")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "learner": _spawn(learner_step, max(1, gpus if args.device == "cuda" else 1), args)}
    transfer = _spawn(broadcast_ranks, 2, args) if gpus >= 2 else broadcast_ipc(args)
    memcpy = memcpy_seconds(args)
    nbytes = args.buffer_mib << 20
    report["transport"] = {**transfer, "bytes": nbytes, "gb_per_s": nbytes / transfer["seconds"] / 1e9,
                           "memcpy_s": memcpy, "memcpy_gb_per_s": nbytes / memcpy / 1e9,
                           "over_memcpy": transfer["seconds"] / memcpy}
    report["publish_source"] = publish_source(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

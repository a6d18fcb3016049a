"""Full-weight publishes through vLLM's own weight-transfer API (``ray.weight_transfer: collective``).

The learner's rank 0 and every engine form one process group (the learner is rank 0, engine k is rank k + 1). A
publish is vLLM's engine calls ``start_weight_update`` → ``update_weights`` (running while the learner broadcasts)
→ ``finish_weight_update``, driven from the learner by a trainer-side engine that
``WeightTransferTrainerFactory.trainer_init`` builds:

- GPU: vLLM's own ``nccl`` trainer engine (packed double buffers), or its ``ipc`` one when the engines share the
  learner's GPU (NCCL cannot put two ranks on one GPU); engines run ``rayuid_nccl`` / ``rayuid_ipc``: vLLM's
  engines plus a ``Digest`` of what they received.
- CPU: ``rayuid_gloo``, because vLLM 0.32 ships no backend that runs on CPU: the same four calls over a gloo group
  from ``stateless_init_torch_distributed_process_group`` (not the default group that FSDP and the in-process
  engine own), sending the learner's flat publish buffer (``rayuid.sdpo.weights``) in buckets, zero-copy on both
  sides, tied weights once.

The backends are registered with vLLM's factories in ``rayuid.system.transfer_backends`` (which imports vLLM; this
module does not). vLLM's NCCL backend silently does nothing when libnccl is missing, so "the calls returned" proves
nothing: after every publish each engine reports (version, checksum of what it received), which the WeightSyncActor
checks against the learner's (``rayuid.system.sync.check_loaded``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import xxhash

from rayuid.sdpo.weights import WeightsBlob, unflatten

GLOO, NCCL_ENGINE, IPC_ENGINE = "rayuid_gloo", "rayuid_nccl", "rayuid_ipc"


class Digest:
    """What a receiver got, tensor by tensor, computed where the tensors are (a GPU never copies a tensor to the
    host): the name, the sum of its 32-bit words and a position-weighted sum of 4096-word blocks. Both ends of the
    NCCL and IPC paths compute it; the gloo path checks the flat buffer's XXH3 (``rayuid.sdpo.weights.checksum``)."""

    def __init__(self):
        self._xxh = xxhash.xxh3_64()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        if raw.storage_offset() % 4:  # a view into a packed buffer after an odd-sized tensor: not int32-aligned
            raw = raw.clone()
        words = raw[: raw.numel() // 4 * 4].view(torch.int32)
        full = words.numel() // 4096 * 4096
        blocks = words[:full].view(-1, 4096).sum(1, dtype=torch.int64)
        weights = torch.arange(1, blocks.numel() + 1, device=blocks.device, dtype=torch.int64)
        sums = torch.stack([words.sum(dtype=torch.int64), (blocks * weights).sum(), raw[raw.numel() // 4 * 4:].sum()])
        self._xxh.update(name.encode())
        self._xxh.update(sums.cpu().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._xxh.hexdigest()


def fingerprint(pairs: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``Digest`` of (name, tensor) pairs in order."""
    digest = Digest()
    for name, tensor in pairs:
        digest.update(name, tensor)
    return digest.hexdigest()


def bucket_bounds(nbytes: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """Pure: [lo, hi) byte ranges of at most ``bucket_bytes`` covering ``nbytes``; sender and receivers share it."""
    return [(lo, min(lo + bucket_bytes, nbytes)) for lo in range(0, nbytes, bucket_bytes)] or [(0, 0)]


def group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group of its own (not the default group)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(address, port, rank, world_size, backend="gloo",
                                                          timeout=timedelta(seconds=timeout_s))


def close_group(holder) -> None:
    """Destroy ``holder.group`` (a stateless group) if it is open."""
    if getattr(holder, "group", None) is not None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        stateless_destroy_torch_distributed_process_group(holder.group)
        holder.group = None


def engine_backend(device: str, shared_gpu: bool = False) -> str:
    """The engine-side backend for an engine on ``device`` ("cuda" or "cpu"); ``shared_gpu``: the learner computes
    on the same GPU (vLLM's ``ipc`` backend: NCCL cannot put two ranks on one GPU)."""
    if device != "cuda":
        return GLOO
    return IPC_ENGINE if shared_gpu else NCCL_ENGINE


def shares_gpu(cfg) -> bool:
    """The learner and the engines share GPUs (fractional num_gpus on both): the ``ipc`` path on CUDA."""
    return 0 < cfg.ray.learner.num_gpus < 1 and 0 < cfg.ray.engine.num_gpus < 1


def engine_init_infos(init_info: dict, engines: int) -> list[dict]:
    """Pure: what each engine's ``init_weight_transfer_engine`` gets. Engine k sits at rank_offset + k where the
    backend has ranks (NCCL, gloo: the sender is rank 0); IPC's init info has no ranks (vLLM rejects unknown
    fields), so every engine gets it as it is."""
    if "rank_offset" not in init_info:
        return [dict(init_info) for _ in range(engines)]
    return [{**init_info, "rank_offset": init_info["rank_offset"] + k} for k in range(engines)]


class EngineGroup:
    """vLLM's ``VLLMWeightSyncClient`` over rayuid's engine actors: engine k joins at rank k + 1 (vLLM's own Ray
    client would give every independent engine the same rank), and every wait has a timeout that names the engine
    (vLLM's waits without one)."""

    def __init__(self, engines: dict, timeout_s: float):
        self.engines, self.timeout_s, self.version = dict(engines), timeout_s, 0

    def _all(self, method: str, per_engine: list[tuple]) -> list:
        import ray

        from rayuid.system.sync import timeout_error

        refs = {name: getattr(h, method).remote(*args) for (name, h), args in zip(self.engines.items(), per_engine)}
        ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        if late:
            raise timeout_error(self.version, [n for n, r in refs.items() if r in late], self.timeout_s)
        return [ray.get(r) for r in refs.values()]

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("transfer_init", [(info,) for info in engine_init_infos(init_info, len(self.engines))])

    def start_weight_update(self) -> None:
        self._all("transfer_start", [()] * len(self.engines))

    def update_weights(self, update_info: dict) -> None:
        self._all("transfer_update", [(update_info,)] * len(self.engines))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("transfer_finish", [(self.version,)] * len(self.engines))

    def close(self) -> None:
        self._all("transfer_close", [()] * len(self.engines))


@dataclass
class Sent:
    """What one collective publish sent: the checksum every engine must report back, its size and seconds."""

    checksum: str
    bytes: int
    send_s: float


def sends_tensors(sender) -> bool:
    """``sender`` is vLLM's NCCL or IPC trainer engine, which broadcasts (name, tensor) pairs on the GPU (the gloo
    one sends the flat host buffer)."""
    return sender is not None and sender.init_info_cls.backend != GLOO


def send(sender, blob: WeightsBlob, client: EngineGroup, tensors: list | None = None,
         dtype: torch.dtype | None = None) -> Sent:
    """One publish of ``blob`` over an open transport: ``sender`` is the trainer-side engine from ``trainer_init``.
    The NCCL and IPC senders read (name, tensor) pairs on the GPU: ``tensors`` (the same version where it already
    is, tied weights once: ``weights.distinct_tensors``; cast to ``dtype`` as they are read) or else ``blob``'s
    views, copied to the GPU. Their checksum is the ``Digest`` of what was read (integer sums: the same on the host
    as on the engine's GPU); the gloo sender sends the flat buffer, checked by its XXH3."""
    t0 = time.perf_counter()
    client.version = blob.version
    if not sends_tensors(sender):
        sender.source = blob
        sender.send_weights()
        return Sent(blob.checksum, blob.num_bytes, time.perf_counter() - t0)
    if tensors is None:
        sender.source = Source(list(unflatten(blob, distinct=True).items()), "cuda")
    else:
        sender.source = Source(tensors, None, dtype)  # already where the sender reads them
    sender.send_weights()
    return Sent(sender.source.digest.hexdigest(), blob.num_bytes, time.perf_counter() - t0)


class Source:
    """A ``WeightSource`` over (name, tensor) pairs on the sender, moved to ``device`` (None: left where each is)
    and floating ones cast to ``dtype``, one at a time as the sender reads them (no second copy of the model at
    once); ``digest`` is the ``Digest`` of what was yielded, updated as it goes."""

    def __init__(self, pairs: list, device: str | None = None, dtype: torch.dtype | None = None):
        from vllm.distributed.weight_transfer.base import ParamMeta

        self.pairs, self.device, self.dtype, self.digest = pairs, device, dtype, Digest()
        self._meta = [ParamMeta(n, self._dtype(t), tuple(t.shape)) for n, t in pairs]

    def _dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype

    def metadata(self):
        return self._meta

    def __iter__(self):
        self.digest = Digest()
        for name, tensor in self.pairs:
            out = tensor.to(self.device or tensor.device, self._dtype(tensor), non_blocking=True)
            self.digest.update(name, out)
            yield name, out


def mode(cfg) -> str:
    """``ray.weight_transfer`` decided for this job: ``object_store`` or ``collective`` (``auto``: collective when
    the learner and the engines have GPUs, and engines are not tensor-parallel). LoRA and per-user runs publish
    adapters, always through the store."""
    r = cfg.ray
    if cfg.model.lora is not None:
        return "object_store"
    if r.weight_transfer == "auto":
        gpus = r.learner.num_gpus > 0 and r.engine.num_gpus > 0
        return "collective" if gpus and r.vllm.tensor_parallel_size == 1 else "object_store"
    if r.weight_transfer == "collective" and r.vllm.tensor_parallel_size > 1:
        raise ValueError("ray.weight_transfer=collective needs ray.vllm.tensor_parallel_size=1 (each engine is "
                         "one rank of the transfer group); set ray.weight_transfer=object_store for tensor-parallel "
                         "engines")
    return r.weight_transfer

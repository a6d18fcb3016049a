"""One learner rank of the Ray system: the offline SDPO step (``rayuid.sdpo.step``) on an FSDP2-sharded model.

Plain torch.distributed, no Ray, so it runs (and is tested) in any process that joined a process group. Every
rank holds 1/world_size of the weights, gradients and AdamW state; parameters are all-gathered per decoder layer
for forward and backward and gradients are reduce-scattered (averaged), as in feasibility.md §3.

Why a wrapper root: ``rayuid.sdpo.scoring`` calls the decoder and the LM head directly, never the causal-LM's own
``forward``, and FSDP2 only all-gathers a group when its module's ``forward`` runs. So the root FSDP unit is
``_Policy``, whose forward simply calls a scoring function on the model: the root group (embeddings, final norm,
LM head) is gathered around every call, and the per-layer groups through their own forwards.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from rayuid.config import TrainConfig
from rayuid.data.templates import ScoringPair
from rayuid.sdpo.models import build_model, load_tokenizer, resolve_model
from rayuid.sdpo.optim import build_optimizer, optimizer_step
from rayuid.sdpo.scoring import response_logprobs as score_response_logprobs
from rayuid.sdpo.step import autocast, score_teacher, sdpo_objective, student_batch
from rayuid.sdpo.teacher_weights import TeacherWeights
from rayuid.sdpo.weights import FlatPacker, WeightsBlob, distinct_tensors, jsonable, pack_state_dict, publish_dtype
from rayuid.system import learner_checkpoint, transport

PHASE_KEYS = ("teacher_s", "student_s", "optim_s", "seconds")
COUNT_KEYS = ("tokens", "tokens_processed", "interactions")


class DistributedSetupError(RuntimeError):
    """The process group could not be formed (wrong backend, unreachable rank 0, timeout)."""


def free_port() -> int:
    """A TCP port that is free on this node now (rank 0 picks the rendezvous port on its own node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def resolve_backend(backend: str = "auto") -> str:
    """'auto' → nccl when CUDA is visible, else gloo; an impossible request fails here with the fix."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedSetupError(
            "ray.backend=nccl needs a CUDA GPU in every learner, but this process sees none "
            "(torch.cuda.is_available() is False). Use ray.backend=gloo (or auto) on CPU, or give the learners "
            "GPUs with ray.learner.num_gpus=1.")
    if backend not in ("gloo", "nccl"):
        raise DistributedSetupError(f"unknown backend {backend!r}; use auto, gloo or nccl")
    return backend


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "auto",
                     timeout_s: float = 300.0) -> str:
    """Join the learners' process group at ``tcp://master_addr:master_port``; returns the backend used."""
    chosen = resolve_backend(backend)
    if dist.is_initialized():
        raise DistributedSetupError("this process already joined a process group; call rayuid.system.learner.destroy() first")
    if chosen == "nccl":
        torch.cuda.set_device(torch.cuda.current_device())
    try:
        dist.init_process_group(chosen, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        dist.barrier()
    except Exception as err:
        raise DistributedSetupError(
            f"learner rank {rank}/{world_size} could not join tcp://{master_addr}:{master_port} ({chosen}) within "
            f"{timeout_s:.0f}s: {err}. Check that all {world_size} learners were started, that rank 0's address is "
            "reachable from every node (firewall, ray.address), and raise ray.sync_timeout_s if nodes are slow."
        ) from err
    return chosen


def destroy() -> None:
    """Leave the process group (idempotent), so a process can join a new group later."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _Policy(nn.Module):
    """FSDP2 root: ``policy(fn, *args)`` runs ``fn(model, *args)`` inside the root's forward (see module doc)."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        # On GPU the scoring code builds its index tensors without a device: make them land on ours.
        context = contextlib.nullcontext() if self.device.type == "cpu" else self.device
        with context:
            return fn(self.model, *args, **kwargs)


class ShardedTeacherWeights(TeacherWeights):
    """TeacherWeights whose swap copies into each rank's shard in place.

    ``TeacherWeights`` swaps ``param.data``; under FSDP2 that is silently ignored, because the all-gather reads
    the flat shard buffer that FSDP keeps (``FSDPParam._sharded_param_data``), not ``param.data``. Copying into
    the local shard (a view of that buffer) is what FSDP then gathers. Must be built after ``fully_shard``.
    """

    def _swap(self) -> None:
        """Three copies through one scratch buffer reused by every swap (a clone per tensor would allocate, and
        page-fault, the whole model twice per teacher call)."""
        with torch.no_grad():
            for name, param in self._params.items():
                live, shadow = _local(param), _local(self.shadow[name])
                saved = self._scratch(live)
                saved.copy_(live)
                live.copy_(shadow)
                shadow.copy_(saved)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A view of this dtype's scratch buffer (as large as the largest local shard), made on first use."""
        buffers = self.__dict__.setdefault("_buffers", {})
        key = (like.dtype, like.device)
        if key not in buffers:
            largest = max(_local(p).numel() for p in self._params.values())
            buffers[key] = torch.empty(largest, dtype=like.dtype, device=like.device)
        return buffers[key][: like.numel()].view(like.shape)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor.data


def shard_model(model: nn.Module, world_size: int, device: torch.device) -> _Policy:
    """``fully_shard`` each decoder layer, then the ``_Policy`` root.

    The root reshards after forward too, so between calls every parameter is a sharded DTensor; the teacher swap
    and the optimizer then always act on what the next forward gathers. With one rank there is nothing to shard:
    the model stays a plain module behind the same ``_Policy`` call (FSDP2 would only add a gather copy per layer
    and call and a reduce copy per gradient: measured 45% slower steps on SmolLM2 here).
    """
    if world_size == 1:
        return _Policy(model, device)
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in hf_model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    policy = _Policy(model, device)
    fully_shard(policy, mesh=mesh, reshard_after_forward=True)
    return policy


def _accumulate(sums: dict[str, float], stats: dict[str, float], weight: float) -> None:
    """Seconds add up; counts add up for real micro-batches; stats are weighted by their share of the batch."""
    for key, value in stats.items():
        if key in PHASE_KEYS:
            scale = 1.0
        elif key in COUNT_KEYS:
            scale = float(weight > 0)
        else:
            scale = weight
        sums[key] = sums.get(key, 0.0) + scale * value


class FsdpLearner:
    """One rank: FSDP2 model + AdamW + schedule + teacher. Every public method is collective: call it on all ranks."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, total_steps: int):
        if not dist.is_initialized():
            raise DistributedSetupError("FsdpLearner needs a process group; call rayuid.system.learner.init_distributed first")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.is_lora = cfg.model.lora is not None
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(resolve_model(cfg.model.name))
        self.pad_id = self.tokenizer.pad_token_id
        model = build_model(cfg, resume_from=None).to(self.device)
        self.policy = shard_model(model, world_size, self.device)
        self.model = model
        self.optimizer, self.scheduler = build_optimizer(model, cfg, total_steps)
        teacher_cls = ShardedTeacherWeights if world_size > 1 else TeacherWeights  # one rank: swap by .data
        self.teacher = teacher_cls(model, cfg.teacher.weights, cfg.teacher.ema_rate)
        self.live = TeacherWeights(model, "live")  # score_teacher's own swap is a no-op; ours wraps the call
        self.packer = FlatPacker()  # one buffer, reused by every published version
        self.sender, self.engine_group, self.last_sent = None, None, None  # collective transport (rank 0)
        self.step = 0

    # ---------------------------------------------------------------- training
    def train_step(self, pairs: list[ScoringPair], teacher_lp: list[list[float]] | None,
                   global_batch_size: int) -> dict:
        """This rank's share of one optimizer step over a global batch the driver split across ranks.

        Micro-batch losses are scaled by ``len(micro) * world_size / global_batch_size`` so that, after FSDP
        averages gradients over ranks, the update is the single-process mean over the global batch.
        """
        t0 = time.perf_counter()
        plan = self._plan(pairs, teacher_lp, global_batch_size)
        sums: dict[str, float] = {}
        for micro, rows, weight in plan:
            stats = self._micro_step(micro, rows, weight * self.world_size)
            _accumulate(sums, stats, weight)
        t1 = time.perf_counter()
        grad_norm = self._optimizer_step()
        self.teacher.after_step()
        self.step += 1
        sums.update(optim_s=time.perf_counter() - t1, seconds=time.perf_counter() - t0, interactions=len(pairs))
        metrics = self.reduce_metrics(sums)
        metrics.update(step=self.step, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0])
        return metrics

    def _plan(self, pairs: list[ScoringPair], teacher_lp: list[list[float]] | None,
              global_batch_size: int) -> list[tuple[list[ScoringPair], list | None, float]]:
        """Micro-batches with their weight; ranks with fewer get zero-weight repeats so collectives match."""
        problem = self._check_inputs(pairs, teacher_lp)
        mb = self.cfg.optim.micro_batch_size
        counts = torch.tensor([-len(pairs), -(-len(pairs) // mb), int(problem is not None)], dtype=torch.long,
                              device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # every rank learns of a bad share, so none waits forever
        fewest, most_micros = -int(counts[0]), int(counts[1])
        if problem is not None:
            raise ValueError(problem)
        if counts[2]:
            raise ValueError("another learner rank rejected its share of the batch; its error says why")
        if fewest == 0:
            raise ValueError("a learner rank got no pairs: the driver must give every rank at least one "
                             f"(global batch {global_batch_size} over {self.world_size} ranks)")
        plan = []
        for i in range(most_micros):
            start = min(i * mb, (len(pairs) - 1) // mb * mb)
            micro = pairs[start: start + mb]
            rows = None if teacher_lp is None else teacher_lp[start: start + mb]
            plan.append((micro, rows, len(micro) / global_batch_size if i * mb < len(pairs) else 0.0))
        return plan

    def _check_inputs(self, pairs: list[ScoringPair], teacher_lp: list[list[float]] | None) -> str | None:
        """Why this rank's share cannot be trained, or None."""
        if teacher_lp is None:
            return None
        if self.cfg.loss.kind != "sampled_token":
            return f"loss.kind={self.cfg.loss.kind} needs teacher logits, not log-probs; set ray.teacher_in=learner"
        if len(teacher_lp) != len(pairs):
            return f"teacher_lp has {len(teacher_lp)} rows for {len(pairs)} pairs; pass one row per pair"
        for pair, row in zip(pairs, teacher_lp):
            if len(row) != len(pair.response):
                return (f"teacher log-probs for pair {pair.id!r} have {len(row)} entries but its response has "
                        f"{len(pair.response)} tokens; score exactly pair.response")
        return None

    def _micro_step(self, micro: list[ScoringPair], rows: list[list[float]] | None, scale: float) -> dict:
        """Teacher scores (given, or a no-grad forward here) → student objective → ``backward(loss * scale)``."""
        t0 = time.perf_counter()
        with autocast(self.model, self.cfg.model.compute_dtype):
            scores = self.teacher_scores(micro) if rows is None else self.pad_teacher_lp(micro, rows)
        t1 = time.perf_counter()
        with autocast(self.model, self.cfg.model.compute_dtype):
            value, stats = self.policy(sdpo_objective, micro, scores, self.cfg.loss, self.pad_id)
        (value * scale).backward()
        t2 = time.perf_counter()
        tokens = sum(len(p.student_prompt) + len(p.response) for p in micro)
        if rows is None:
            tokens += sum(len(p.teacher_prompt) + len(p.response) for p in micro)
        return dict(stats, loss=float(value.detach()), teacher_s=t1 - t0, student_s=t2 - t1, tokens_processed=tokens)

    def teacher_scores(self, micro: Sequence[ScoringPair]) -> torch.Tensor:
        """``step.score_teacher`` with the configured teacher weights swapped into the shards around the call."""
        with self.teacher.applied():
            return self.policy(score_teacher, micro, self.live, self.cfg.loss, self.pad_id)

    def pad_teacher_lp(self, micro: Sequence[ScoringPair], rows: Sequence[Sequence[float]]) -> torch.Tensor:
        """Per-pair teacher log-probs (aligned with ``pair.response``) → (B, T) as ``student_batch`` lays it out."""
        width = max(max(len(p.response) for p in micro), 1)
        out = torch.zeros((len(micro), width), dtype=torch.float32, device=self.device)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return out

    def _optimizer_step(self) -> float:
        return optimizer_step(self.model, self.optimizer, self.scheduler, self.cfg.optim.max_grad_norm)

    def reduce_metrics(self, local: dict[str, float]) -> dict[str, float]:
        """Batch-weighted stats and counts are summed over ranks; phase seconds take the slowest rank."""
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, local)
        out: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                out[key] = max(out.get(key, value), value) if key in PHASE_KEYS else out.get(key, 0.0) + value
        return out

    # ---------------------------------------------------------------- weights out
    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """All ranks gather; rank 0 gets full CPU tensors under the model's own names, the others ``{}``."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(self.model, options=opts)

    def export_weights(self, version: int, cast: str | None = None) -> WeightsBlob | None:
        """The current policy as one blob on rank 0 (None elsewhere): the LoRA adapter, or full HF weights cast to
        ``cast`` (the serve dtype: what the engines compute in) while they are packed. The blob shares this learner's pack
        buffer: put it in the object store before the next export. Tied weights (the LM head of SmolLM2) go under
        both names: vLLM's layerwise reload puts back the old head when it gets the embedding alone (measured:
        served log-probs 0.5 nats off; tests/test_engine.py)."""
        if self.world_size == 1 and not self.is_lora:  # the one shard is the full tensor: no gather, no copy
            state = self._own_state()
        else:
            state = self.full_state_dict(trainable_only=self.is_lora)
        if self.rank != 0:
            return None
        if self.is_lora:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(self.model, state_dict=state)
            return pack_state_dict(adapter, version, "lora", self.lora_config())
        # tied names share one slot; last_sent always describes what the reused buffer holds
        self.last_sent = self.packer.pack(state, version, "full", dtype=publish_dtype(cast))
        return self.last_sent

    def _own_state(self) -> dict[str, torch.Tensor]:
        return {k: _local(v) for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------- collective publishes (ray.weight_transfer)
    def open_transport(self, engines: dict, address: str, port: int, bucket_bytes: int, timeout_s: float,
                       shared_gpu: bool = False) -> None:
        """Rank 0 forms the transfer group with every engine (vLLM's trainer-side engine); other ranks hold none."""
        if self.rank != 0:
            return
        self.close_transport()
        self.engine_group = transport.EngineGroup(engines, timeout_s)
        from rayuid.system.transfer_backends import open_sender  # imports vLLM: only where collective is used

        self.sender = open_sender(self.engine_group, address, port, len(engines) + 1, bucket_bytes, timeout_s,
                                  self.device.type, shared_gpu)

    def send_weights(self, version: int, cast: str | None = None) -> dict:
        """Every rank joins the gather first; then rank 0 alone broadcasts (interleaving the two hangs FSDP2).
        Returns on rank 0 what every engine must report back; ``{}`` elsewhere. The packed host copy comes first
        (``last_sent``: what a restarted engine, or every engine after a failed send, loads); then one full-weight
        rank with vLLM's NCCL/IPC sender sends the model's own tensors, cast on its GPU one at a time (no
        host-to-GPU copy), and any other sender the packed buffer."""
        t0 = time.perf_counter()
        blob = self.export_weights(version, cast)
        if blob is None:
            return {}
        export_s = time.perf_counter() - t0
        direct = self.world_size == 1 and not self.is_lora and transport.sends_tensors(self.sender)
        tensors = distinct_tensors(self._own_state()) if direct else None
        sent = transport.send(self.sender, blob, self.engine_group, tensors, publish_dtype(cast))
        return {"checksum": sent.checksum, "bytes": sent.bytes, "export_s": export_s, "put_s": 0.0,
                "send_s": sent.send_s}

    def close_transport(self) -> None:
        if self.sender is not None:
            self.sender.shutdown()
            self.sender = None

    def lora_config(self) -> dict:
        return jsonable(self.model.peft_config["default"].to_dict())

    @torch.no_grad()
    def response_logprobs(self, pairs: list[ScoringPair]) -> list[list[float]]:
        """Current student log-probs of each ``pair.response`` (canaries; identical on every rank)."""
        mb = self.cfg.optim.micro_batch_size
        out: list[list[float]] = []
        for start in range(0, len(pairs), mb):
            micro = pairs[start: start + mb]
            with autocast(self.model, self.cfg.model.compute_dtype):
                lp = self.policy(score_response_logprobs, student_batch(micro, self.pad_id), self.cfg.loss.chunk_size)
            out += [lp[i, : len(p.response)].float().cpu().tolist() for i, p in enumerate(micro)]
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | Path, extra: dict) -> str:
        """Resumable sharded state (DCP) + an HF folder in ``path/hf`` (a local path or a URI); written atomically.
        Returns the path."""
        return learner_checkpoint.save(self, str(path), extra)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore a ``save_checkpoint`` folder (any world size); returns the driver's ``extra``."""
        return learner_checkpoint.load(self, str(path))

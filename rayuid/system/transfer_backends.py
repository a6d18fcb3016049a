"""rayuid's weight-transfer backend for CPU (``rayuid_gloo``) and vLLM's NCCL / IPC engines with a receive digest
(``rayuid_nccl``, ``rayuid_ipc``), as vLLM's factories want them: engine side (inside vLLM's worker) and trainer
side (learner rank 0). It imports vLLM: the driver never imports it; every vLLM worker does, through
``rayuid.system.vllm_worker``, and learner rank 0 when it opens a collective transport."""

from __future__ import annotations

from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLWeightTransferEngine

from rayuid.sdpo.weights import TensorSpec, WeightsBlob, checksum, unflatten
from rayuid.system.transport import (
    GLOO,
    IPC_ENGINE,
    NCCL_ENGINE,
    Digest,
    Source,
    bucket_bounds,
    close_group,
    group,
)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int
    timeout_s: float

@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    index: list              # [name, dtype, shape, offset, nbytes] per tensor (rayuid.sdpo.weights.TensorSpec)
    nbytes: int
    version: int

class GlooEngine(WeightTransferEngine):
    """Engine side (inside vLLM's worker): receive the flat buffer in buckets, load it layer by layer."""

    init_info_cls, update_info_cls = GlooInitInfo, GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group, self.bucket_bytes, self.received = None, 0, ""

    def init_transfer_engine(self, info) -> None:
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + info.rank_offset
        self.group = group(info.master_address, info.master_port, rank, info.world_size, info.timeout_s)
        self.bucket_bytes = info.bucket_bytes

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:  # the base class syncs an accelerator: none on CPU
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, info) -> None:
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        for lo, hi in bucket_bounds(info.nbytes, self.bucket_bytes):
            self.group.broadcast(buffer[lo:hi], 0).wait()
        blob = WeightsBlob(info.version, "full", buffer.numpy(), tuple(TensorSpec(n, d, tuple(s), o, b)
                                                                      for n, d, s, o, b in info.index),
                           checksum(buffer.numpy()))
        self.received = blob.checksum
        self.model.load_weights(list(unflatten(blob).items()))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        close_group(self)

@dataclass
class GlooTrainerInit(TrainerInitInfo):
    backend: ClassVar[str] = GLOO
    master_address: str = "127.0.0.1"
    master_port: int = 0
    world_size: int = 2
    bucket_bytes: int = 256 << 20
    timeout_s: float = 300.0

class GlooSender(TrainerWeightTransferEngine):
    """Trainer side (learner rank 0): broadcast slices of the flat publish buffer (``source``: a WeightsBlob)."""

    init_info_cls = GlooTrainerInit

    @classmethod
    def trainer_init(cls, init_info, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.bucket_bytes = init_info.bucket_bytes
        if engine.is_sender:
            worker = GlooInitInfo(init_info.master_address, init_info.master_port, 1, init_info.world_size,
                                  init_info.bucket_bytes, init_info.timeout_s)
            engine.group = _rendezvous(client, asdict(worker), init_info)
        return engine

    def send_weights(self) -> None:
        blob: WeightsBlob = self.source
        info = GlooUpdateInfo([[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in blob.index],
                              blob.num_bytes, blob.version)
        flat = torch.from_numpy(blob.data)
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))  # engines receive meanwhile
            for lo, hi in bucket_bounds(blob.num_bytes, self.bucket_bytes):
                self.group.broadcast(flat[lo:hi], 0).wait()
            received.result()
        finally:
            pool.shutdown(wait=False)  # a failed broadcast leaves the engines blocked: never wait for them here
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        close_group(self)


def _rendezvous(client, worker_info: dict, init_info):
    """Rank 0 joins the group while the engines do (they block until every member has joined); an engine that
    cannot join (e.g. it died) fails this at once instead of after the group's timeout."""
    pool = ThreadPoolExecutor(2)
    try:
        joined = pool.submit(client.init_weight_transfer_engine, worker_info)
        formed = pool.submit(group, init_info.master_address, init_info.master_port, 0, init_info.world_size,
                             init_info.timeout_s)
        wait([joined, formed], return_when=FIRST_EXCEPTION)
        if joined.done() and joined.exception() is not None:
            raise joined.exception()
        result = formed.result()
        joined.result()
        return result
    finally:
        pool.shutdown(wait=False)


def _checked(base: type) -> type:
    """vLLM's ``base`` engine, plus the ``Digest`` of every tensor it loads in one update, over every chunk of it
    (what the engine then reports)."""

    class Checked(base):
        def start_weight_update(self) -> None:
            self._digest = Digest()  # one per update: vLLM's packed IPC sender ships a version in several chunks
            super().start_weight_update()

        def receive_weights(self, update_info) -> None:
            if getattr(self, "_digest", None) is None:
                self._digest = Digest()
            load, digest = self.model.load_weights, self._digest

            def digested(pairs):
                pairs = list(pairs)
                for name, tensor in pairs:
                    digest.update(name, tensor)
                return load(pairs)

            self.model.load_weights = digested
            try:
                super().receive_weights(update_info)
            finally:
                del self.model.load_weights
            self.received = digest.hexdigest()

    Checked.__name__ = Checked.__qualname__ = f"Checked{base.__name__}"
    return Checked


CheckedNCCLEngine = _checked(NCCLWeightTransferEngine)
CheckedIPCEngine = _checked(IPCWeightTransferEngine)


def register() -> None:
    """Register rayuid's backends with vLLM's two factories (idempotent; call before building an engine)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    if GLOO in WeightTransferEngineFactory._registry:
        return
    WeightTransferEngineFactory.register_engine(GLOO, GlooEngine)
    WeightTransferTrainerFactory.register_engine(GLOO, GlooSender)
    WeightTransferEngineFactory.register_engine(NCCL_ENGINE, CheckedNCCLEngine)
    WeightTransferEngineFactory.register_engine(IPC_ENGINE, CheckedIPCEngine)


def open_sender(client, address: str, port: int, world_size: int, bucket_bytes: int, timeout_s: float,
                device: str, shared_gpu: bool = False):
    """The trainer-side engine of learner rank 0, joined with every engine ``client`` reaches: on a GPU vLLM's NCCL
    sender (vLLM's IPC sender when the engines share the learner's GPU), on CPU rayuid's gloo sender; all built by
    vLLM's ``WeightTransferTrainerFactory``."""
    register()
    if device == "cuda" and shared_gpu:
        info = IPCTrainerInitInfo(rank=0, packed=True, packed_buffer_size_bytes=bucket_bytes)
        return WeightTransferTrainerFactory.trainer_init(info, client=client, source=Source([], "cuda"))
    if device == "cuda":
        info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=0,
                                   packed=True, packed_buffer_size_bytes=bucket_bytes)
        return WeightTransferTrainerFactory.trainer_init(info, client=client, source=Source([], "cuda"))
    info = GlooTrainerInit(master_address=address, master_port=port, world_size=world_size,
                           bucket_bytes=bucket_bytes, timeout_s=timeout_s, rank=0)
    return WeightTransferTrainerFactory.trainer_init(info, client=client)

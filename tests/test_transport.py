"""Weights through vLLM's own weight-transfer API (rayuid.system.transport): the gloo backend moves a version into a
real vLLM engine, and a transport that delivers the wrong bytes is caught by the (version, checksum) check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from rayuid.config import EngineSettings
from rayuid.sdpo.models import load_causal_lm
from rayuid.sdpo.scoring import collate, response_logprobs
from rayuid.sdpo.weights import FlatPacker
from rayuid.system import transfer_backends, transport
from rayuid.system.sync import SyncError, check_loaded

SETTINGS = EngineSettings(max_model_len=512, kv_cache_memory_bytes=64 << 20)
PROMPTS, RESPONSES = [[1, 40, 41, 42], [1, 60, 61]], [[50, 51, 52, 2], [70, 71]]


def test_buckets_cover_the_buffer_exactly():
    for n in range(0, 40):
        for size in (1, 3, 8, 64):
            bounds = transport.bucket_bounds(n, size)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(hi - lo <= size and hi > lo for lo, hi in bounds if n) and \
                all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_fingerprint_sees_every_byte_name_and_order():
    a, b = torch.arange(10_000, dtype=torch.float32), torch.ones(7, dtype=torch.bfloat16)
    base = transport.fingerprint([("a", a), ("b", b)])
    assert base == transport.fingerprint([("a", a.clone()), ("b", b.clone())])
    flipped = a.clone()
    flipped[9_000] += 1
    assert base != transport.fingerprint([("a", flipped), ("b", b)])                  # one value in a late block
    swapped = a.clone()
    swapped[[0, 5000]] = swapped[[5000, 0]]
    assert base != transport.fingerprint([("a", swapped), ("b", b)])                  # same sum, other positions
    assert base != transport.fingerprint([("b", b), ("a", a)])
    assert base != transport.fingerprint([("a", a), ("c", b)])
    assert base != transport.fingerprint([("a", a), ("b", torch.zeros(7, dtype=torch.bfloat16))])


def test_distinct_tensors_match_the_packed_views_tied_and_empty_tensors_included():
    """The pairs a GPU sender reads from the learner's memory (cast one at a time by the Source) equal what the host
    buffer holds (the copy a restarted engine loads): names in order, a tied tensor once, dtypes cast, values, the
    metadata vLLM's sender checks them against, and the Digest."""
    from rayuid.sdpo.weights import distinct_tensors, pack_state_dict, unflatten

    emb = torch.randn(6, 4)
    state = {"embed.weight": emb, "empty": torch.zeros(0), "norm.weight": torch.ones(4), "lm_head.weight": emb,
             "odd": torch.randn(3, dtype=torch.float32)[:1].to(torch.bfloat16), "steps": torch.tensor([3])}
    assert distinct_tensors(state)[0][1].data_ptr() == emb.data_ptr()  # the tensor itself: no copy
    for dtype in (None, torch.bfloat16):
        source = transport.Source(distinct_tensors(state), "cpu", dtype)
        sent = list(source)
        host = list(unflatten(pack_state_dict(state, 1, dtype=dtype), distinct=True).items())
        assert [n for n, _ in sent] == [n for n, _ in host] == ["embed.weight", "empty", "norm.weight", "odd", "steps"]
        assert all(a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(sent, host))
        assert [(m.name, m.dtype, m.shape) for m in source.metadata()] == [(n, t.dtype, tuple(t.shape)) for n, t in sent]
        assert source.digest.hexdigest() == transport.fingerprint(host)


def test_digest_reads_a_view_that_is_not_word_aligned():
    """vLLM unpacks a packed buffer into views at running byte offsets: after an odd-sized bf16 tensor the next one
    starts off a 4-byte boundary, where an int32 view would fail."""
    flat = torch.arange(12, dtype=torch.bfloat16)
    odd, rest = flat[:3], flat[3:]
    assert rest.storage_offset() * 2 % 4 == 2
    assert transport.fingerprint([("a", odd), ("b", rest)]) == transport.fingerprint([("a", odd.clone()),
                                                                                     ("b", rest.clone())])


class LocalClient:
    """vLLM's VLLMWeightSyncClient over one in-process engine (the Ray one is rayuid.system.transport.EngineGroup)."""

    def __init__(self, engine):
        self.engine, self.version = engine, 0

    def init_weight_transfer_engine(self, init_info):
        self.engine.transfer_init(init_info)

    def start_weight_update(self):
        self.engine.transfer_start()

    def update_weights(self, update_info):
        self.engine.transfer_update(update_info)

    def finish_weight_update(self, weight_version=None):
        self.engine.transfer_finish(self.version)


def _scores(model):
    with torch.no_grad():
        lp = response_logprobs(model, collate(PROMPTS, RESPONSES, pad_id=0))
    return [lp[i, : len(r)].tolist() for i, r in enumerate(RESPONSES)]


@pytest.fixture(scope="module")
def gloo_engine(tmp_path_factory, tiny_llama_dir):
    """A real vLLM engine built for the gloo backend, serving a TIED model (the LM head shares the embedding), and
    the sender joined to it through vLLM's WeightTransferTrainerFactory."""
    from rayuid.sdpo.models import load_tokenizer
    from rayuid.system.engine import VllmEngine

    folder = tmp_path_factory.mktemp("tied")
    model = load_causal_lm(tiny_llama_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(folder)
    load_tokenizer(tiny_llama_dir).save_pretrained(folder)
    engine = VllmEngine(str(folder), SETTINGS, seed=0, transfer=transport.GLOO)
    client = LocalClient(engine)
    from rayuid.system.learner import free_port

    sender = transfer_backends.open_sender(client, "127.0.0.1", free_port(), 2, bucket_bytes=1 << 16, timeout_s=60,
                                           device="cpu")
    yield engine, sender, client, str(folder)
    sender.shutdown()
    engine.transfer_close()
    engine.close()


@pytest.mark.slow
def test_gloo_publish_serves_the_new_weights_tied_head_included(gloo_engine):
    engine, sender, client, folder = gloo_engine
    model = load_causal_lm(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    packer = FlatPacker()
    before = engine.score(PROMPTS, RESPONSES)
    for version in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        blob = packer.pack(model.state_dict(), version)
        sent = transport.send(sender, blob, client)          # 16 KiB buckets: the buffer goes in many pieces
        assert sent.checksum == blob.checksum and sent.bytes == blob.num_bytes
        check_loaded(version, blob.checksum, {"engine0": (engine.version, engine.checksum, 0.0)})
        for got, ref in zip(engine.score(PROMPTS, RESPONSES), _scores(model)):
            assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    assert max(abs(a - b) for a, b in zip(engine.score(PROMPTS, RESPONSES)[0], before[0])) > 1e-3


@pytest.mark.slow
def test_a_transport_that_delivers_other_bytes_is_caught_naming_the_engine(gloo_engine):
    """As vLLM's NCCL backend does without libnccl: every call returns, the engine loads what it has. The check
    compares what the engine received with what the learner packed, and names the engine."""
    engine, sender, client, folder = gloo_engine
    blob = FlatPacker().pack(load_causal_lm(folder).state_dict(), version=7)
    real = sender.group

    class Lossy:  # the sender's buffer never reaches the wire: zeros of the same size do
        def broadcast(self, tensor, root):
            return real.broadcast(torch.zeros_like(tensor), root)

    sender.group = Lossy()
    try:
        transport.send(sender, blob, client)
    finally:
        sender.group = real
    assert engine.version == 7 and engine.checksum != blob.checksum
    with pytest.raises(SyncError, match="engine0"):
        check_loaded(7, blob.checksum, {"engine0": (engine.version, engine.checksum, 0.0)})


@pytest.mark.slow
def test_an_update_a_failed_publish_left_open_does_not_block_the_next(gloo_engine):
    """A publish that fails after an engine's ``start_weight_update`` leaves vLLM's update session open (vLLM closes
    it only when ``update_weights`` raised) and vLLM then refuses every later start: the store fallback and the
    next collective publish still serve their version."""
    engine, sender, client, folder = gloo_engine
    model = load_causal_lm(folder)
    packer = FlatPacker()
    for version, path in ((11, "store"), (12, "collective")):
        engine.transfer_start()                               # the start of a publish that failed right after
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        blob = packer.pack(model.state_dict(), version)
        if path == "store":
            assert engine.load_weights(blob)[:2] == (version, blob.checksum)
        else:
            transport.send(sender, blob, client)
            check_loaded(version, blob.checksum, {"engine0": (engine.version, engine.checksum, 0.0)})
        for got, ref in zip(engine.score(PROMPTS, RESPONSES), _scores(model)):
            assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4


def test_each_engine_gets_init_info_its_vllm_backend_parses():
    """vLLM's NCCL trainer hands the engines one init info at rank_offset 1: engine k must join at rank 1 + k. Its
    IPC trainer hands them ``{"packed": ...}``, which has no ranks: it must arrive unchanged (vLLM's engine rejects
    an unknown field, so a rank_offset added to it fails the first publish on a shared GPU)."""
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    nccl = asdict(NCCLWeightTransferInitInfo(master_address="10.0.0.1", master_port=29600, rank_offset=1,
                                             world_size=4))
    infos = transport.engine_init_infos(nccl, 3)
    assert [NCCLWeightTransferInitInfo(**i).rank_offset for i in infos] == [1, 2, 3]
    assert all({**i, "rank_offset": 1} == nccl for i in infos)
    ipc = transport.engine_init_infos({"packed": True}, 2)
    assert [IPCWeightTransferInitInfo(**i).packed for i in ipc] == [True, True] and ipc == [{"packed": True}] * 2
    gloo = asdict(transfer_backends.GlooInitInfo("127.0.0.1", 29601, 1, 3, 1 << 16, 60.0))
    assert [transfer_backends.GlooInitInfo(**i).rank_offset for i in transport.engine_init_infos(gloo, 2)] == [1, 2]


def test_an_engine_that_does_not_join_the_group_is_named_when_the_wait_times_out(local_ray):
    """vLLM's own Ray client waits for its engines without a timeout; rayuid's group names the late engine."""
    import ray

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self, hang_s: float):
            self.hang_s, self.got = hang_s, None

        def transfer_init(self, info: dict) -> None:
            time.sleep(self.hang_s)
            self.got = info

        def info(self):
            return self.got

    engines = {"engine0": Engine.remote(0.0), "teacher0": Engine.remote(30.0)}
    group = transport.EngineGroup(engines, timeout_s=2.0)
    t0 = time.perf_counter()
    with pytest.raises(SyncError, match=r"timed out after 2s waiting for teacher0\. "):
        group.init_weight_transfer_engine({"master_address": "127.0.0.1", "rank_offset": 1})
    assert time.perf_counter() - t0 < 10
    assert ray.get(engines["engine0"].info.remote()) == {"master_address": "127.0.0.1", "rank_offset": 1}
    for handle in engines.values():
        ray.kill(handle)


def test_lora_adapters_keep_the_adapter_path_under_either_transport(tiny_model_dir):
    from rayuid.config import load_config

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    for transfer in ("object_store", "collective", "auto"):
        cfg = load_config(jobs / "smoke.yaml", [f"model.name={tiny_model_dir}", f"ray.weight_transfer={transfer}",
                                                "model.lora={r: 4}"])
        assert transport.mode(cfg) == "object_store"


def test_an_engines_digest_covers_every_chunk_of_one_update():
    """vLLM's packed IPC sender calls update_weights once per chunk: the engine must report the Digest of the whole
    version (what the learner's Source computed), not of its last chunk, and start afresh with the next update."""

    class Model:
        def __init__(self):
            self.loaded = []

        def load_weights(self, pairs):
            self.loaded += list(pairs)

    class Base:  # the part of vLLM's NCCL/IPC engines that Checked relies on
        def __init__(self):
            self.model = Model()

        def start_weight_update(self):
            pass

        def receive_weights(self, update_info):
            self.model.load_weights(update_info)

    engine = transfer_backends._checked(Base)()
    pairs = [(f"w{i}", torch.randn(5 + i)) for i in range(4)]
    for version in range(2):
        engine.start_weight_update()
        engine.receive_weights(pairs[:3])
        engine.receive_weights(pairs[3:])
        assert engine.received == transport.fingerprint(pairs)
    assert [n for n, _ in engine.model.loaded] == [n for n, _ in pairs] * 2

"""The sharded learner: it reproduces the offline trainer, 2 Ray ranks equal 1, LoRA exports load in peft, and a
checkpoint resumes exactly."""

from __future__ import annotations

import pytest
import torch

from rayuid.config import TrainConfig
from rayuid.data.extract import Interaction
from rayuid.data.templates import build_pair
from rayuid.system import transport

FOLLOWUPS = ["Too long, one sentence please.", "Thanks, perfect!", "Please be more formal.", "No emojis please."]
RAY_TIMEOUT_S = 120


def _pairs(tokenizer, n: int = 8) -> list:
    return [build_pair(tokenizer, Interaction(f"c{i}:1", f"c{i}", 1,
                                              [{"role": "user", "content": f"Tell me about topic {i}."}],
                                              "The quick brown fox jumps over the lazy dog. " * (1 + i % 3),
                                              FOLLOWUPS[i % 4]))
            for i in range(n)]


def _config(model_dir: str, **over) -> dict:
    base = dict(seed=7, threads=1, model={"name": model_dir},
                template={"max_prompt_tokens": 128, "max_response_tokens": 64},
                optim={"lr": 1e-3, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_ratio": 0.0,
                       "max_grad_norm": 0.5})
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------ plain module, one process, no Ray

@pytest.fixture()
def process_group():
    from rayuid.system import learner as sharded

    sharded.init_distributed(0, 1, "127.0.0.1", sharded.free_port(), backend="gloo")
    yield
    sharded.destroy()


def _reference_teacher_rows(model, batch, teacher, cfg: TrainConfig, pad_id: int) -> list[list[float]]:
    """The live teacher's log-probs, scored in the same micro-batches train_batch uses (same padding)."""
    from rayuid.sdpo.step import score_teacher

    rows = []
    mb = cfg.optim.micro_batch_size
    for start in range(0, len(batch), mb):
        chunk = batch[start: start + mb]
        lp = score_teacher(model, chunk, teacher, cfg.loss, pad_id)
        rows += [lp[i, : len(p.response)].tolist() for i, p in enumerate(chunk)]
    return rows


@pytest.mark.parametrize("teacher", ["live", "ema"])
def test_one_rank_train_step_equals_the_offline_trainer(process_group, tiny_model_dir, tiny_tokenizer, teacher):
    """live: teacher log-probs handed in (as from vLLM); ema: scored in the learner with the sharded EMA teacher."""
    from rayuid.sdpo import models, optim, step
    from rayuid.sdpo.step import length_order
    from rayuid.sdpo.teacher_weights import TeacherWeights
    from rayuid.system.learner import FsdpLearner

    torch.set_num_threads(1)
    cfg = TrainConfig.model_validate(_config(tiny_model_dir, teacher={"weights": teacher, "ema_rate": 0.5}))
    pairs, pad = _pairs(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id
    pairs = [pairs[i] for i in length_order(pairs)]  # as the driver hands them over (rayuid.system.phases.learn)
    learner = FsdpLearner(cfg, rank=0, world_size=1, total_steps=4)
    ref = models.build_model(cfg, None)
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    optimizer, scheduler = optim.build_optimizer(ref, cfg, 4)
    ref_teacher = TeacherWeights(ref, teacher, cfg.teacher.ema_rate)
    for _ in range(2):
        rows = _reference_teacher_rows(ref, pairs, ref_teacher, cfg, pad) if teacher == "live" else None
        metrics = learner.train_step(pairs, rows, global_batch_size=len(pairs))
        sums = step.train_batch(ref, pairs, ref_teacher, cfg, pad)
        grad_norm = optim.optimizer_step(ref, optimizer, scheduler, cfg.optim.max_grad_norm)
        ref_teacher.after_step()
        assert abs(metrics["loss"] - sums["loss"]) < 1e-6 and abs(metrics["grad_norm"] - grad_norm) < 1e-5
        assert metrics["tokens"] == sums["tokens"] and metrics["interactions"] == 4
    exported = learner.export_weights(version=2)
    from rayuid.sdpo.weights import unflatten

    weights = unflatten(exported)
    assert exported.kind == "full" and exported.version == 2
    assert _max_diff(weights, ref.state_dict()) < 1e-6
    assert _max_diff(weights, initial) > 1e-4  # the update is real, not a no-op


def test_bad_teacher_rows_are_rejected_before_any_collective(process_group, tiny_model_dir, tiny_tokenizer):
    from rayuid.system.learner import FsdpLearner

    learner = FsdpLearner(TrainConfig.model_validate(_config(tiny_model_dir)), rank=0, world_size=1, total_steps=2)
    pairs = _pairs(tiny_tokenizer, 2)
    with pytest.raises(ValueError, match="score exactly pair.response"):
        learner.train_step(pairs, [[0.0] * len(p.response) for p in pairs[:1]] + [[0.0]], global_batch_size=2)
    with pytest.raises(ValueError, match="one row per pair"):
        learner.train_step(pairs, [[0.0]], global_batch_size=2)
    assert learner.step == 0


class _TensorSender:
    """Stands in for vLLM's NCCL trainer engine: records the (name, tensor) pairs its source yields."""

    class init_info_cls:
        backend = "rayuid_nccl"

    def __init__(self, fail: bool = False):
        self.fail = fail

    def send_weights(self):
        self.sent = list(self.source)
        if self.fail:
            raise RuntimeError("NCCL broke part-way")


def test_one_gpu_style_rank_sends_its_own_tensors_and_keeps_the_host_copy_engines_reload(
        process_group, tiny_model_dir):
    """With vLLM's NCCL/IPC sender a single rank sends the model's tensors, not views of the host pack buffer (no
    host round trip before the GPU), with the same names, values and dtype as the host copy that a restarted engine
    loads through the object store; the checksum it reports is their Digest (what a GPU engine computes)."""
    from types import SimpleNamespace

    from rayuid.sdpo.weights import unflatten
    from rayuid.system.learner import FsdpLearner

    learner = FsdpLearner(TrainConfig.model_validate(_config(tiny_model_dir)), rank=0, world_size=1, total_steps=2)
    learner.sender, learner.engine_group = _TensorSender(), SimpleNamespace(version=0)
    out = learner.send_weights(3, "bfloat16")
    blob = learner.last_sent
    host = list(unflatten(blob, distinct=True).items())
    sent = learner.sender.sent
    assert blob.version == learner.engine_group.version == 3
    assert [n for n, _ in sent] == [n for n, _ in host] and all(t.dtype == torch.bfloat16 for _, t in sent)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(sent, host))
    assert out["checksum"] == transport.fingerprint(host)
    lo = blob.data.ctypes.data
    assert not any(lo <= t.data_ptr() < lo + blob.num_bytes for _, t in sent)  # not staged in the host buffer
    fp32 = learner.send_weights(4, "float32")
    params = {n: p.data_ptr() for n, p in learner.model.named_parameters()}
    same = [t.data_ptr() == params[n] for n, t in learner.sender.sent if n in params]
    assert same and all(same)                                                   # no cast: the parameters themselves
    assert fp32["checksum"] == transport.fingerprint(list(unflatten(learner.last_sent, distinct=True).items()))


def test_a_send_that_fails_leaves_this_version_packed_for_the_store_fallback(process_group, tiny_model_dir):
    """The weight-sync actor's fallback loads ``last_sent`` when its version is the one that failed: it must be
    packed before the send starts, with a checksum that matches its bytes."""
    from types import SimpleNamespace

    from rayuid.sdpo.weights import verify
    from rayuid.system.learner import FsdpLearner

    learner = FsdpLearner(TrainConfig.model_validate(_config(tiny_model_dir)), rank=0, world_size=1, total_steps=2)
    learner.sender, learner.engine_group = _TensorSender(fail=True), SimpleNamespace(version=0)
    with pytest.raises(RuntimeError, match="part-way"):
        learner.send_weights(5, "bfloat16")
    assert learner.last_sent.version == 5
    verify(learner.last_sent)


def test_rendezvous_timeout_says_what_to_check():
    from rayuid.system import learner as sharded

    with pytest.raises(sharded.DistributedSetupError, match="were started"):
        sharded.init_distributed(0, 2, "127.0.0.1", sharded.free_port(), backend="gloo", timeout_s=1)
    sharded.destroy()


def test_backend_errors_say_how_to_fix():
    from rayuid.system.learner import DistributedSetupError, resolve_backend

    assert resolve_backend("gloo") == "gloo"
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "gloo"
        with pytest.raises(DistributedSetupError, match="ray.backend=gloo"):
            resolve_backend("nccl")


# ------------------------------------------------------------------ Ray actors, several processes

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _group(ray, cfg_json: dict, world_size: int, total_steps: int = 5) -> list:
    from rayuid.system.actors.learner import LearnerWorker

    worker = ray.remote(num_cpus=0.5)(LearnerWorker)
    actors = [worker.remote(cfg_json, rank, world_size, total_steps) for rank in range(world_size)]
    addr, port = ray.get([actors[0].node_ip.remote(), actors[0].free_port.remote()], timeout=RAY_TIMEOUT_S)
    ray.get([a.setup.remote(addr, port) for a in actors], timeout=RAY_TIMEOUT_S)
    return actors


def _close(ray, actors: list) -> None:
    ray.get([a.shutdown.remote() for a in actors], timeout=RAY_TIMEOUT_S)
    for actor in actors:
        ray.kill(actor)


def _call(ray, actors: list, method: str, *args) -> list:
    return ray.get([getattr(a, method).remote(*args) for a in actors], timeout=RAY_TIMEOUT_S)


def _step(ray, actors: list, batch: list, rows: list | None, first: int | None = None) -> dict:
    """The driver's split: rank r gets an equal slice of the global batch (and of its teacher rows); with two
    ranks ``first`` makes it uneven (rank 0 gets that many)."""
    k = len(batch) // len(actors)
    cuts = [r * k for r in range(len(actors))] + [len(batch)]
    if first is not None and len(actors) == 2:
        cuts = [0, first, len(batch)]
    refs = [a.train_step.remote(batch[cuts[r]:cuts[r + 1]], None if rows is None else rows[cuts[r]:cuts[r + 1]],
                                len(batch)) for r, a in enumerate(actors)]
    metrics = ray.get(refs, timeout=RAY_TIMEOUT_S)
    assert all(m["loss"] == metrics[0]["loss"] for m in metrics)  # every rank reports the global metrics
    return metrics[0]


def _export(ray, actors: list, version: int):
    from rayuid.sdpo.weights import unflatten

    outs = _call(ray, actors, "export_weights", version)
    assert set(outs[0]) == {"ref", "checksum", "bytes", "export_s", "put_s"} and all(not x for x in outs[1:])
    blob = ray.get(outs[0]["ref"], timeout=RAY_TIMEOUT_S)  # one object per version, from rank 0
    assert blob.checksum == outs[0]["checksum"] and blob.num_bytes == outs[0]["bytes"]
    assert not blob.data.flags.writeable  # read zero-copy out of the object store, not a private copy
    return blob, unflatten(blob)


@pytest.fixture(scope="module")
def full_runs(ray_cluster, tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The same 5 steps on 2 ranks and on 1 rank: steps 1-2 with teacher log-probs handed in, 3-4 scored in the
    learner with an EMA teacher, 5 split unevenly. The 2-rank group also checkpoints after step 1."""
    from rayuid.sdpo.models import load_causal_lm
    from rayuid.sdpo.step import score_teacher
    from rayuid.sdpo.teacher_weights import TeacherWeights

    ray, pairs = ray_cluster, _pairs(tiny_tokenizer, 8)
    base = load_causal_lm(tiny_model_dir)
    with torch.no_grad():  # a stale "vLLM" teacher: the base model, one pair at a time
        rows = [score_teacher(base, [p], TeacherWeights(base), TrainConfig().loss, tiny_tokenizer.pad_token_id)
                [0, : len(p.response)].tolist() for p in pairs]
    cfg = _config(tiny_model_dir, teacher={"weights": "ema", "ema_rate": 0.5}, ray={"teacher_in": "learner"})
    ckpt = tmp_path_factory.mktemp("learner_ckpt") / "step-1"
    batches = [(pairs[:4], rows[:4]), (pairs[4:], rows[4:]), (pairs[:4], None), (pairs[4:], None),
               (pairs[2:6], rows[2:6])]  # step 5: split 3 + 1 on two ranks (rank 1 pads with a zero-weight repeat)
    out = {"cfg": cfg, "batches": batches, "ckpt": ckpt}
    for world in (2, 1):
        actors = _group(ray, cfg, world)
        run = out[world] = {"metrics": [], "weights": {}}
        for i, (batch, teacher_rows) in enumerate(batches, start=1):
            run["metrics"].append(_step(ray, actors, batch, teacher_rows, first=3 if i == 5 else None))
            run["weights"][i] = _export(ray, actors, i)[1]
            if world == 2 and i == 1:
                _call(ray, actors, "save_checkpoint", str(ckpt), {"step": 1, "version": 1, "ledger": ["a", "b"]})
        _close(ray, actors)
    return out


@pytest.mark.slow
def test_two_ranks_give_the_same_weights_as_one_rank(full_runs):
    for step in (1, 2, 3, 4, 5):  # 1-2: teacher log-probs handed in; 3-4: EMA teacher in the learner; 5: uneven
        assert _max_diff(full_runs[2]["weights"][step], full_runs[1]["weights"][step]) < 1e-5, step
    for step, (m2, m1) in enumerate(zip(full_runs[2]["metrics"], full_runs[1]["metrics"]), start=1):
        assert abs(m2["loss"] - m1["loss"]) < 1e-5
        if step < 5:  # token-mean stats are averaged per micro-batch (as offline): equal when micro-batches are
            assert abs(m2["adv_mean"] - m1["adv_mean"]) < 1e-5
        assert m2["tokens"] == m1["tokens"] and m2["interactions"] == m1["interactions"] == 4
        assert m2["tokens_processed"] == m1["tokens_processed"]
    assert _max_diff(full_runs[2]["weights"][4], full_runs[2]["weights"][1]) > 1e-4


@pytest.mark.slow
def test_checkpoint_resumes_exactly_and_exports_an_hf_folder(ray_cluster, full_runs):
    from transformers import AutoModelForCausalLM

    ray, ckpt = ray_cluster, full_runs["ckpt"]
    hf = AutoModelForCausalLM.from_pretrained(ckpt / "hf").state_dict()
    assert _max_diff({k: hf[k] for k in full_runs[2]["weights"][1]}, full_runs[2]["weights"][1]) == 0.0
    actors = _group(ray, full_runs["cfg"], 2)
    extras = _call(ray, actors, "load_checkpoint", str(ckpt))
    assert extras == [{"step": 1, "version": 1, "ledger": ["a", "b"]}] * 2
    for step in (2, 3):  # step 3 scores with the restored EMA teacher shadow
        batch, rows = full_runs["batches"][step - 1]
        metrics = _step(ray, actors, batch, rows)
        assert metrics["step"] == step
        assert _max_diff(_export(ray, actors, step)[1], full_runs[2]["weights"][step]) < 1e-6, step
    _close(ray, actors)


@pytest.mark.slow
def test_lora_export_loads_into_peft_and_reproduces_the_learner(ray_cluster, tiny_model_dir, tiny_tokenizer,
                                                                 tmp_path):
    from peft import PeftModel

    from rayuid.sdpo.models import load_causal_lm
    from rayuid.sdpo.scoring import response_logprobs
    from rayuid.sdpo.step import student_batch
    from rayuid.sdpo.weights import write_adapter

    ray, pairs = ray_cluster, _pairs(tiny_tokenizer, 4)
    cfg = _config(tiny_model_dir, model={"name": tiny_model_dir, "lora": {"r": 4, "alpha": 8}})
    actors = _group(ray, cfg, 2)
    _step(ray, actors, pairs, None)
    blob, tensors = _export(ray, actors, 1)
    learner_lp = _call(ray, actors, "response_logprobs", pairs)
    _close(ray, actors)
    assert blob.kind == "lora" and all(".default." not in k and "lora_" in k for k in tensors)
    assert max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k) > 0  # B starts at 0: it trained
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(write_adapter(blob, tmp_path / "adapter")))
    with torch.no_grad():
        lp = response_logprobs(model, student_batch(pairs, tiny_tokenizer.pad_token_id))
    expected = [lp[i, : len(p.response)] for i, p in enumerate(pairs)]
    assert learner_lp[0] == learner_lp[1]
    assert max((torch.tensor(a) - b).abs().max().item() for a, b in zip(learner_lp[0], expected)) < 1e-5


def test_learner_actor_says_to_call_setup_first(monkeypatch, tiny_model_dir):
    from rayuid import logs
    from rayuid.system.actors.learner import LearnerWorker

    monkeypatch.setattr(logs, "configure", lambda *a: None)  # leave this test process's logging alone
    worker = LearnerWorker(_config(tiny_model_dir), rank=0, world_size=1, total_steps=1)
    assert worker.precision()["dtype"] == "float32" and worker.precision()["compute_dtype"] == "float32"
    with pytest.raises(RuntimeError, match=r"setup\(master_addr, master_port\) must run on every rank first"):
        worker.learner

"""Offline trainer: steps, checkpoints that transformers/peft load, exact resume, teacher variants, accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayuid.config import TrainConfig
from rayuid.data.pairs import example_order, load_pairs
from rayuid.offline.trainer import train
from rayuid.sdpo.models import build_model
from rayuid.sdpo.step import train_batch
from rayuid.sdpo.teacher_weights import TeacherWeights

FOLLOWUPS = ["Too long, one sentence please.", "Thanks, perfect!", "Please be more formal.", "No emojis please."]


@pytest.fixture()
def interactions_file(tmp_path) -> str:
    path = tmp_path / "interactions.jsonl"
    with path.open("w") as fh:
        for i in range(10):
            record = {"id": f"c{i}:1", "conversation_id": f"c{i}", "turn": 1,
                      "context": [{"role": "user", "content": f"Tell me about topic {i}."}],
                      "response": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3),
                      "followup": FOLLOWUPS[i % 4]}
            fh.write(json.dumps(record) + "\n")
    return str(path)


def _config(tmp_path, model_dir, data, **over) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / over.pop("name", "run")), seed=7, threads=1,
                model={"name": model_dir}, data={"paths": [data]},
                template={"max_prompt_tokens": 128, "max_response_tokens": 64},
                optim={"lr": 1e-3, "micro_batch_size": 2, "grad_accum_steps": 2, "epochs": 2, "warmup_ratio": 0.0},
                checkpoint={"every_steps": 1, "keep_last": 10})
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(base)


def _losses(run_dir) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_full_finetune_run_writes_metrics_summary_and_loadable_checkpoint(tmp_path, tiny_model_dir, interactions_file):
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, tiny_model_dir, interactions_file)
    summary = train(cfg)
    assert summary["steps_done"] == 5 and summary["interactions_trained"] == 20  # ceil(2 epochs * 10 / 4)
    records = [json.loads(ln) for ln in Path(summary["metrics"]).read_text().splitlines()]
    for key in ("loss", "adv_mean", "adv_std", "adv_eos_mean", "tokens_per_s", "lr", "grad_norm", "teacher_s"):
        assert all(isinstance(r[key], float) and r[key] == r[key] for r in records), key
    saved = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(saved.parameters(), initial.parameters()))
    assert moved > 1e-4
    assert (Path(summary["checkpoint"]) / "tokenizer_config.json").exists()
    assert Path(summary["plot"]).stat().st_size > 1000
    assert json.loads((Path(cfg.run_dir) / "summary.json").read_text())["steps_done"] == 5


def test_interrupted_then_resumed_run_reproduces_the_losses(tmp_path, tiny_model_dir, interactions_file):
    straight = train(_config(tmp_path, tiny_model_dir, interactions_file, name="straight"))
    cfg = _config(tmp_path, tiny_model_dir, interactions_file, name="resumed")
    first = train(cfg, stop_after=2)
    assert first["steps_done"] == 2
    second = train(cfg)
    assert second["steps_done"] == 5
    a, b = _losses(straight["run_dir"]), _losses(cfg.run_dir)
    assert len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    state = torch.load(Path(second["checkpoint"]) / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5 and state["data_position"] == 20


def test_lora_adapter_checkpoint_loads_in_peft(tmp_path, tiny_model_dir, interactions_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, tiny_model_dir, interactions_file, model={"lora": {"r": 4, "alpha": 8}},
                  optim={"max_steps": 2})
    summary = train(cfg)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(ckpt))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0  # trained away from B = 0


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_teacher_shadow_weights(mode, tmp_path, tiny_model_dir, interactions_file):
    cfg = _config(tmp_path, tiny_model_dir, interactions_file, teacher={"weights": mode, "ema_rate": 0.5})
    model = build_model(cfg, None)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = TeacherWeights(model, mode, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.after_step()
    for name, param in model.named_parameters():
        expected = initial[name] if mode == "frozen" else initial[name] + 0.5
        assert torch.allclose(teacher.shadow[name], expected, atol=1e-6)
        with teacher.applied():
            assert torch.allclose(param, expected, atol=1e-6)
        assert torch.allclose(param, initial[name] + 1.0)
    assert optimizer is not None


def test_grad_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir, interactions_file):
    grads = []
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = _config(tmp_path, tiny_model_dir, interactions_file, optim={"micro_batch_size": mb, "grad_accum_steps": accum})
        model = build_model(cfg, None)
        from rayuid.sdpo.models import load_tokenizer

        tok = load_tokenizer(tiny_model_dir)
        pairs, _ = load_pairs(cfg, tok)
        stats = train_batch(model, pairs[:4], TeacherWeights(model), cfg, tok.pad_token_id)
        grads.append((torch.cat([p.grad.flatten() for p in model.parameters()]), stats["loss"]))
    for grad, loss in grads[1:]:
        assert torch.allclose(grad, grads[0][0], atol=1e-6)
        assert abs(loss - grads[0][1]) < 1e-6


def test_length_sorted_micro_batches_give_the_unsorted_gradient(tmp_path, tiny_model_dir, interactions_file):
    from rayuid.sdpo.models import load_tokenizer
    from rayuid.sdpo.step import length_order, micro_step

    cfg = _config(tmp_path, tiny_model_dir, interactions_file, optim={"micro_batch_size": 2, "grad_accum_steps": 3})
    tok = load_tokenizer(tiny_model_dir)
    pairs, _ = load_pairs(cfg, tok)
    pairs = pairs[:6]
    lengths = [len(p.student_prompt) + len(p.response) for p in pairs]
    order = length_order(pairs)
    assert sorted(order) == list(range(6)) and [lengths[i] for i in order] == sorted(lengths)
    assert order != list(range(6))  # the fixture's lengths are mixed, so the grouping really changes
    grads = []
    for sort in (False, True):
        model = build_model(cfg, None)
        if sort:
            train_batch(model, pairs, TeacherWeights(model), cfg, tok.pad_token_id)
        else:  # the reference: micro-batches in arrival order
            for i in range(0, 6, 2):
                micro_step(model, pairs[i: i + 2], TeacherWeights(model), cfg.loss, tok.pad_token_id, 2 / 6)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().max() > 1e-3


def test_distribution_loss_kinds_train(tmp_path, tiny_model_dir, interactions_file):
    for kind in ("reverse_kl", "jsd"):
        cfg = _config(tmp_path, tiny_model_dir, interactions_file, name=kind, loss={"kind": kind, "topk": 16},
                      optim={"max_steps": 1})
        summary = train(cfg)
        assert summary["steps_done"] == 1 and summary["final_loss"] >= 0


def test_example_order_is_a_permutation_per_epoch_and_deterministic():
    order = example_order(7, 3, seed=1)
    assert [sorted(order[i * 7:(i + 1) * 7]) for i in range(3)] == [list(range(7))] * 3
    assert order == example_order(7, 3, seed=1) and order != example_order(7, 3, seed=2)

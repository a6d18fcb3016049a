"""The single-process online loop the official code runs, built from rayuid's own pieces, as a baseline.

Per step: HF ``generate`` for the step's prompts, the rule-based user, then per micro-batch a no-grad teacher
forward on x⊕o and a student forward/backward, then the optimizer step. Same prompts, batch size, sampling and
loss settings as the Ray run it is compared with.
"""

from __future__ import annotations

import time

import torch

from rayuid import precision
from rayuid.config import TrainConfig
from rayuid.data.extract import Interaction
from rayuid.data.prompts import load_prompts, prompts_for_step
from rayuid.data.templates import TemplateOptions, build_pair, render_prompt_ids
from rayuid.feedback.users import make_simulator
from rayuid.sdpo.models import build_model, load_tokenizer, resolve_model
from rayuid.sdpo.optim import build_optimizer, optimizer_step
from rayuid.sdpo.step import autocast, train_batch
from rayuid.sdpo.teacher_weights import TeacherWeights


def _generate(model, tokenizer, prompts, cfg: TrainConfig, options: TemplateOptions) -> list[list[int]]:
    """Left-padded batch generation; returns the new token ids per prompt (EOS kept, padding dropped)."""
    ids = [render_prompt_ids(tokenizer, p.messages, options.max_prompt_tokens) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    s = cfg.online.sampling
    with torch.no_grad(), autocast(model, cfg.model.compute_dtype):  # the precision the Ray system computes in
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=s.temperature,
                             top_p=s.top_p, top_k=0, max_new_tokens=s.max_tokens, pad_token_id=tokenizer.pad_token_id)
    replies = []
    for row in out[:, width:].tolist():
        cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        replies.append(row[:cut])
    return replies


def run_baseline(cfg: TrainConfig, steps: int) -> dict:
    """``steps`` timed steps after one warm-up step; returns interactions/s and seconds per phase."""
    cfg = precision.decide_model(cfg)
    tokenizer = load_tokenizer(resolve_model(cfg.model.name))
    model = build_model(cfg, None)
    optimizer, scheduler = build_optimizer(model, cfg, steps + 1)
    teacher = TeacherWeights(model, cfg.teacher.weights, cfg.teacher.ema_rate)
    user = make_simulator(cfg.online.user.kind, cfg.online.user.persona, **cfg.online.user.params)
    prompts = load_prompts(cfg.online.prompts, cfg.online.system_prompt)
    t = cfg.template
    options = TemplateOptions(t.hindsight, t.max_prompt_tokens, t.max_response_tokens, t.append_eos)
    phases = {"generate_s": 0.0, "simulate_s": 0.0, "learn_s": 0.0}
    timed = reply_tokens = 0
    for step in range(steps + 1):
        batch = [prompts[i] for i in prompts_for_step(len(prompts), cfg.online.prompts_per_step, step, cfg.seed)]
        t0 = time.perf_counter()
        replies = _generate(model, tokenizer, batch, cfg, options)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        t1 = time.perf_counter()
        followups = user.respond([p.messages[-1]["content"] for p in batch], texts)
        t2 = time.perf_counter()
        pairs = [build_pair(tokenizer, Interaction(id=f"{step}-{k}", conversation_id=p.id, turn=1,
                                                   context=p.messages, response=x, followup=o), options, r)
                 for k, (p, r, x, o) in enumerate(zip(batch, replies, texts, followups))]
        stats = train_batch(model, pairs, teacher, cfg, tokenizer.pad_token_id)
        optimizer_step(model, optimizer, scheduler, cfg.optim.max_grad_norm)
        teacher.after_step()
        t3 = time.perf_counter()
        if step > 0:  # step 0 is warm-up
            timed += len(pairs)
            reply_tokens += int(stats["tokens"])
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[key] += value
    return {"rate": timed / sum(phases.values()), "phases": phases, "compute_dtype": cfg.model.compute_dtype,
            "reply_tokens_per_interaction": reply_tokens / timed}

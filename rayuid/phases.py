"""The driver's phases as functions: each fans a batch out to actors explicitly and gathers the results.

Engine calls survive an engine crash: Ray restarts the actor (``max_restarts``), it comes back at version 0, the
WeightSyncActor loads the current version into it, and the same call is retried on it. Calls are deterministic in
their inputs (ids, seeds), so a retried call trains nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from rayuid.actors.spawn import System
from rayuid.data.extract import Interaction
from rayuid.engine import Generation
from rayuid.prompts import Prompt
from rayuid.step import length_order
from rayuid.templates import ScoringPair, TemplateOptions, build_pair, render_prompt_ids

log = logging.getLogger(__name__)
ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@dataclass
class Sample:
    """One online interaction on its way to the learner."""

    id: str
    prompt: Prompt
    generation: Generation
    followup: str = ""
    pair: ScoringPair | None = None
    score_version: int = -1
    user: str | None = None


def shard(items: list, n: int) -> list[list]:
    """Contiguous, near-equal shards (the driver splits; actors never decide who gets what)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def recover_engine(system: System, name: str, timeout_s: float) -> None:
    """The WeightSyncActor waits until Ray has restarted engine ``name``, then loads the current weights into it."""
    ray.get(system.sync.sync_engine.remote(name), timeout=timeout_s)


def call_engine(system: System, name: str, method: str, *args, timeout_s: float, retries: int):
    """``engines[name].method(*args)``, retried on a restarted engine after it is brought to the current version."""
    for attempt in range(retries + 1):
        try:
            return ray.get(getattr(system.engines[name], method).remote(*args), timeout=timeout_s)
        except ACTOR_DIED as err:
            if attempt == retries:
                raise
            log.warning("engine %s died during %s (%s); retrying on its restarted actor", name, method,
                        type(err).__name__)
            recover_engine(system, name, timeout_s)
    raise AssertionError("unreachable")


def fan_out(system: System, names: list[str], method: str, shards: list[tuple], timeout_s: float,
            retries: int) -> list:
    """Submit every shard, then collect; a shard whose engine died is retried alone."""
    refs = [getattr(system.engines[n], method).remote(*args) for n, args in zip(names, shards)]
    results = []
    for name, args, ref in zip(names, shards, refs):
        try:
            results.append(ray.get(ref, timeout=timeout_s))
        except ACTOR_DIED:
            log.warning("engine %s died during %s; retrying on its restarted actor", name, method)
            recover_engine(system, name, timeout_s)
            results.append(call_engine(system, name, method, *args, timeout_s=timeout_s, retries=retries))
    return results


def generate(system: System, tokenizer, prompts: list[Prompt], step: int, sampling: dict, options: TemplateOptions,
             seed: int, timeout_s: float, retries: int, users: list[str | None] | None = None,
             unknown_user: str = "base") -> list[Sample]:
    """n replies per prompt (``users[i]``: the adapter that serves prompt i); ids ``s{step}-{slot}`` are the same on
    every retry."""
    ids = [render_prompt_ids(tokenizer, p.messages, options.max_prompt_tokens) for p in prompts]
    parts = shard(list(range(len(prompts))), len(system.rollout))
    jobs = [(n, idx) for n, idx in zip(system.rollout, parts) if idx]
    outs = fan_out(system, [n for n, _ in jobs], "generate",
                   [([ids[i] for i in idx], sampling, seed + step * 1000 + k,
                     [users[i] for i in idx] if users is not None else None, unknown_user)
                    for k, (_, idx) in enumerate(jobs)], timeout_s, retries)
    samples = []
    for (_, idx), per_prompt in zip(jobs, outs):
        for i, gens in zip(idx, per_prompt):
            for j, gen in enumerate(gens):
                user = users[i] if users is not None else None
                samples.append(Sample(f"s{step}-{i * len(gens) + j}", prompts[i], gen, user=user))
    return samples


def simulate(system: System, samples: list[Sample], timeout_s: float, retries: int) -> None:
    """The simulated user's next message for each (prompt, reply); retried on a restarted simulator."""
    prompts = [s.prompt.messages[-1]["content"] for s in samples]
    replies = [s.generation.text for s in samples]
    for attempt in range(retries + 1):
        try:
            followups = ray.get(system.user.respond.remote(prompts, replies), timeout=timeout_s)
            break
        except ACTOR_DIED:
            if attempt == retries:
                raise
            log.warning("user simulator died; retrying on its restarted actor")
    for sample, followup in zip(samples, followups):
        sample.followup = followup


def online_pairs(tokenizer, samples: list[Sample], options: TemplateOptions) -> None:
    for s in samples:
        interaction = Interaction(id=s.id, conversation_id=s.prompt.id, turn=len(s.prompt.messages),
                                  context=s.prompt.messages, response=s.generation.text, followup=s.followup)
        s.pair = build_pair(tokenizer, interaction, options, response_ids=s.generation.token_ids)


def score(system: System, pairs: list[ScoringPair], timeout_s: float, retries: int) -> tuple[list, list[int]]:
    """Teacher log-probs for every pair from the teacher engines (one prefill per engine) and their versions."""
    parts = [p for p in shard(pairs, len(system.teacher)) if p]
    names = system.teacher[: len(parts)]
    outs = fan_out(system, names, "score",
                   [([p.student_prompt for p in part], [p.teacher_prompt for p in part], [p.response for p in part])
                    for part in parts], timeout_s, retries)
    teacher_lp, versions = [], []
    for part, out in zip(parts, outs):
        teacher_lp += out["teacher_lp"]
        versions += [out["version"]] * len(part)
    return teacher_lp, versions


def learn(system: System, pairs: list[ScoringPair], teacher_lp: list | None, timeout_s: float) -> dict:
    """One optimizer step: rank r gets shard r of the global batch, ordered by length (so each rank's
    micro-batches hold similar lengths: less padding, the same gradient); all ranks step together."""
    n = len(system.learners)
    order = length_order(pairs)
    pairs = [pairs[i] for i in order]
    teacher_lp = None if teacher_lp is None else [teacher_lp[i] for i in order]
    pair_shards = shard(pairs, n)
    lp_shards = shard(teacher_lp, n) if teacher_lp is not None else [None] * n
    refs = [l.train_step.remote(p, t, len(pairs)) for l, p, t in zip(system.learners, pair_shards, lp_shards)]
    return ray.get(refs, timeout=timeout_s)[0]

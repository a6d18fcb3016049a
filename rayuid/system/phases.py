"""The driver's phases as functions: each fans a batch out to actors explicitly and returns what it produced.

Every actor call goes through ``Calls`` (``rayuid.system.calls``): the run's timeout, and a retry on an engine or
simulator that Ray restarted. Nothing here mutates its inputs: a sample, once generated, is only read.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayuid.data.extract import Interaction
from rayuid.data.prompts import Prompt
from rayuid.data.templates import ScoringPair, TemplateOptions, build_pair, render_prompt_ids
from rayuid.sdpo.step import length_order
from rayuid.seeds import sampling_seed
from rayuid.system.calls import Calls
from rayuid.system.engine import Generation


@dataclass(frozen=True)
class Sample:
    """One online reply: its prompt, what the engine generated (text, token ids, version) and whose it is."""

    id: str
    prompt: Prompt
    generation: Generation
    user: str | None = None


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn: vLLM sampling settings, the run's seed, and the adapter of an unknown user."""

    params: dict
    seed: int
    unknown_user: str = "base"



def shard(items: list, n: int) -> list[list]:
    """Contiguous, near-equal shards (the driver splits; actors never decide who gets what)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def generate(calls: Calls, tokenizer, prompts: list[Prompt], step: int, sampling: Sampling,
             options: TemplateOptions, users: list[str | None] | None = None) -> list[Sample]:
    """``sampling.params["n"]`` replies per prompt (``users[i]``: the adapter that serves prompt i); ids
    ``s{step}-{slot}`` and seeds are the same on every retry."""
    ids = [render_prompt_ids(tokenizer, p.messages, options.max_prompt_tokens) for p in prompts]
    parts = shard(list(range(len(prompts))), len(calls.system.rollout))
    jobs = [(n, idx) for n, idx in zip(calls.system.rollout, parts) if idx]
    outs = calls.engines([n for n, _ in jobs], "generate",
                         [([ids[i] for i in idx], sampling.params, sampling_seed(sampling.seed, step, k),
                           [users[i] for i in idx] if users is not None else None, sampling.unknown_user)
                          for k, (_, idx) in enumerate(jobs)])
    samples = []
    for (_, idx), per_prompt in zip(jobs, outs):
        for i, gens in zip(idx, per_prompt):
            for j, gen in enumerate(gens):
                user = users[i] if users is not None else None
                samples.append(Sample(f"s{step}-{i * len(gens) + j}", prompts[i], gen, user=user))
    return samples


def simulate(calls: Calls, samples: list[Sample]) -> list[str]:
    """The simulated user's next message after each (prompt, reply), the batch split over the user replicas."""
    parts = [part for part in shard(samples, len(calls.system.users)) if part]
    outs = calls.user("respond", [([s.prompt.messages[-1]["content"] for s in part],
                                   [s.generation.text for s in part]) for part in parts])
    return [followup for out in outs for followup in out]


def online_pairs(tokenizer, samples: list[Sample], followups: list[str], options: TemplateOptions) -> list[ScoringPair]:
    """(x, y, o) of each sample, tokenised for the student (x ⊕ y) and the teacher (x ⊕ o ⊕ y)."""
    pairs = []
    for s, followup in zip(samples, followups, strict=True):
        interaction = Interaction(id=s.id, conversation_id=s.prompt.id, turn=len(s.prompt.messages),
                                  context=s.prompt.messages, response=s.generation.text, followup=followup)
        pairs.append(build_pair(tokenizer, interaction, options, response_ids=s.generation.token_ids))
    return pairs


def score(calls: Calls, pairs: list[ScoringPair]) -> tuple[list, list[int]]:
    """Teacher log-probs for every pair from the scoring engines (one prefill per engine) and their versions."""
    parts = [p for p in shard(pairs, len(calls.system.teacher)) if p]
    names = calls.system.teacher[: len(parts)]
    outs = calls.engines(names, "score", [([p.student_prompt for p in part], [p.teacher_prompt for p in part],
                                           [p.response for p in part]) for part in parts])
    teacher_lp, versions = [], []
    for part, out in zip(parts, outs):
        teacher_lp += out["teacher_lp"]
        versions += [out["version"]] * len(part)
    return teacher_lp, versions


def learn(calls: Calls, pairs: list[ScoringPair], teacher_lp: list | None) -> dict:
    """One optimizer step: rank r gets shard r of the global batch, ordered by length (so each rank's
    micro-batches hold similar lengths: less padding, the same gradient); all ranks step together."""
    n = len(calls.system.learners)
    order = length_order(pairs)
    pairs = [pairs[i] for i in order]
    teacher_lp = None if teacher_lp is None else [teacher_lp[i] for i in order]
    lp_shards = shard(teacher_lp, n) if teacher_lp is not None else [None] * n
    return calls.learners("train_step", [(p, t, len(pairs)) for p, t in zip(shard(pairs, n), lp_shards)])[0]

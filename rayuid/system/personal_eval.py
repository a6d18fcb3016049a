"""Held-out evaluation of per-user personalization runs (paper §6.6-§6.7, Figs 4-6 and 9).

At every evaluation point each user's adapter answers the held-out prompts greedily (one multi-LoRA batch), and
each of the user's personas judges the replies programmatically: adherence (share of replies the persona accepts)
and win rate vs the base model's reply to the same prompt. Baselines, computed once: the base model, and the
in-context oracle (the base model with the persona in its system prompt). At the end, every user's persona also
judges every other user's adapter: does each adapter fit its own user best?

Outputs in the run dir: ``results.json`` (everything), ``results.csv`` (one row per point × user × persona) and
``results.png`` (adherence and win-rate curves per user, baselines dashed).
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from rayuid.config import TrainConfig
from rayuid.data.prompts import Prompt, with_system_prompt
from rayuid.feedback import judges
from rayuid.feedback.measures import JudgeFn, measure
from rayuid.feedback.users import make_persona
from rayuid.personal.report import plot, write_csv
from rayuid.personal.schedule import persona_at, phase_at
from rayuid.system.evaluation import greedy_replies
from rayuid.system.phases import shard


def _key(persona: str, params: dict) -> str:
    return persona + "".join(f"|{k}={v}" for k, v in sorted(params.items()))


class PersonalEval:
    def __init__(self, cfg: TrainConfig, prompts: list[Prompt], options):
        self.cfg, self.prompts, self.options = cfg, prompts, options
        self.users = {u.id: u for u in cfg.online.users}
        self.rows: list[dict] = []
        self.base: list[str] | None = None
        self.oracle: dict[str, list[str]] = {}
        self.replies: dict[str, list[str]] = {}
        self.judge: JudgeFn | None = None
        self.judge_actors: list = []                  # the JudgeWorker replicas behind ``judge`` (for their stats)
        self.phase_start: dict[str, list[str]] = {}   # "user/phase" → replies when that phase began

    def _greedy(self, calls, tokenizer, prompts: list[Prompt], users: list[str | None]) -> list[str]:
        o = self.cfg.online
        return greedy_replies(calls, tokenizer, prompts, self.options, o.sampling.max_tokens, users, o.unknown_user)

    def _connect_judge(self, calls) -> None:
        """The LLM judge replicas (``online.judge``), bound to the held-out prompts."""
        self.judge_actors = list(getattr(getattr(calls, "system", None), "judges", []))
        if not self.judge_actors:
            return
        prompts = [p.messages[-1]["content"] for p in self.prompts]
        self.judge = lambda desc, xs, ys: judge_split(calls, self.judge_actors, desc, prompts, xs, ys)

    def _baseline_prompts(self, calls) -> tuple[list[str], list[Prompt]]:
        """The base model's held-out prompts, then each in-context oracle's (one per distinct persona and
        parameters): the oracle keys and the prompts, answered with no adapter."""
        self._connect_judge(calls)
        specs = {} if not self.cfg.online.oracle else {
            _key(p, u.persona_params(p)): (p, u.persona_params(p)) for u in self.users.values() for p in u.personas}
        views = [with_system_prompt(p, make_persona(name, **params).description)
                 for name, params in specs.values() for p in self.prompts]
        return list(specs), self.prompts + views

    def __call__(self, calls, tokenizer, step: int, versions: dict[str, int]) -> list[dict]:
        """Evaluate every user's current adapter after ``step`` steps; returns the new rows. The first evaluation
        also answers the base and oracle prompts, in the same greedy batch (one decode pass serves all)."""
        first = self.base is None
        keys, baseline = self._baseline_prompts(calls) if first else ([], [])
        ids, o, n = list(self.users), self.cfg.online, len(self.prompts)
        texts = self._greedy(calls, tokenizer, baseline + self.prompts * len(ids),
                             [None] * len(baseline) + [u for u in ids for _ in self.prompts])
        if first:
            self.base = texts[:n]
            self.oracle = {key: texts[(i + 1) * n: (i + 2) * n] for i, key in enumerate(keys)}
        texts = texts[len(baseline):]
        rows = []
        for k, uid in enumerate(ids):
            self.replies[uid] = texts[k * n: (k + 1) * n]
            user = self.users[uid]
            self.phase_start.setdefault(f"{uid}/{phase_at(user, step, o.switch_every)}", self.replies[uid])
            active = persona_at(user, max(step - 1, 0), o.switch_every)
            for persona in dict.fromkeys(user.personas):
                row = {"step": step, "interactions": step * o.prompts_per_step * o.sampling.n, "user": uid,
                       "persona": persona, "active": persona == active, "version": versions.get(uid, 0)}
                params = user.persona_params(persona)
                rows.append({**row, **measure(persona, params, self.replies[uid], self.base, self.judge),
                             **self._vs_phase_start(uid, persona, params, step)})
        self.rows = [r for r in self.rows if r["step"] != step] + rows  # a re-evaluated step replaces its rows
        return rows

    def _vs_phase_start(self, uid: str, persona: str, params: dict, step: int) -> dict:
        """Paper Fig 6: a preference is measured against the policy of the moment it was (last) introduced."""
        user = self.users[uid]
        now = phase_at(user, max(step - 1, 0), self.cfg.online.switch_every)
        began = [i for i in range(now + 1) if user.personas[i] == persona and f"{uid}/{i}" in self.phase_start]
        if not began or len(user.personas) < 2 or judges.verify(persona, "probe", **params) is None:
            return {}
        start = self.phase_start[f"{uid}/{began[-1]}"]
        wr = judges.win_rate([judges.programmatic_preference(persona, a, b, **params)
                              for a, b in zip(self.replies[uid], start)])
        return {"win_rate_vs_phase_start": wr.rate, "win_rate_vs_phase_start_se": wr.se}

    def baselines(self) -> list[dict]:
        """Base and oracle measured by every persona of the run."""
        out = []
        for uid, user in self.users.items():
            for persona in dict.fromkeys(user.personas):
                params = user.persona_params(persona)
                out.append({"user": uid, "persona": persona, "system": "base",
                            **measure(persona, params, self.base, self.base)})  # the base ties itself
                if _key(persona, params) in self.oracle:
                    out.append({"user": uid, "persona": persona, "system": "oracle",
                                **measure(persona, params, self.oracle[_key(persona, params)], self.base, self.judge)})
        return out

    def cross(self) -> list[dict]:
        """Each user's (final) persona judges every user's adapter: vs base, and own adapter vs that adapter."""
        out = []
        for judge_id, judge in self.users.items():
            persona = judge.personas[-1]
            params = judge.persona_params(persona)
            checkable = judges.verify(persona, "probe", **params) is not None
            if not checkable and self.judge is None:
                continue
            own = self.replies[judge_id]
            for adapter_id, replies in self.replies.items():
                m = measure(persona, params, replies, self.base, self.judge)
                if checkable:
                    own_vs = [judges.programmatic_preference(persona, a, b, **params) for a, b in zip(own, replies)]
                elif adapter_id == judge_id:
                    own_vs = ["tie"] * len(own)  # the own adapter against itself: no judge call needed
                else:
                    own_vs = self.judge(make_persona(persona, **params).description, own, replies)
                wr = judges.win_rate(own_vs)
                out.append({"judge_user": judge_id, "persona": persona, "adapter": adapter_id,
                            "adherence": m.get("adherence"), "win_rate_vs_base": m["win_rate"],
                            "own_adapter_win_rate": wr.rate, "own_adapter_se": wr.se})
        return out

    def retention(self) -> list[dict]:
        """Users with a persona schedule: each persona's adherence when its phase ended and at the end of the run."""
        out, every = [], self.cfg.online.switch_every
        for uid, user in self.users.items():
            if len(user.personas) < 2:
                continue
            for i, persona in enumerate(user.personas):
                mine = [r for r in self.rows if r["user"] == uid and r["persona"] == persona and "adherence" in r]
                phase_end = [r for r in mine if r["step"] <= (i + 1) * every] or mine[:1]
                if mine:
                    out.append({"user": uid, "persona": persona, "phase_end_step": phase_end[-1]["step"],
                                "adherence_at_phase_end": phase_end[-1]["adherence"],
                                "adherence_at_end": mine[-1]["adherence"]})
        return out

    def state(self) -> dict:
        return {"rows": self.rows, "phase_start": self.phase_start}

    def restore(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))
        self.phase_start = dict(state.get("phase_start", {}))

    def finish(self, run_dir: Path) -> dict:
        results = {"prompts": [p.messages[-1]["content"] for p in self.prompts], "rows": self.rows,
                   "judge": judge_stats(self.judge_actors),
                   "baselines": self.baselines(), "cross": self.cross(), "retention": self.retention(),
                   "samples": {"base": self.base[:3], **{u: r[:3] for u, r in self.replies.items()}}}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_csv(run_dir / "results.csv", self.rows)
        o = self.cfg.online
        plot(run_dir / "results.png", self.rows, results["baselines"],
             o.switch_every * o.prompts_per_step * o.sampling.n if o.switch_every else None, self.users)
        return results


def judge_split(calls, actors: list, description: str, prompts: list[str], xs: list[str], ys: list[str]) -> list[str]:
    """"x" / "y" / "tie" per prompt, the prompts split over the judge replicas (all asked at once)."""
    parts = [idx for idx in shard(list(range(len(prompts))), len(actors)) if idx]
    refs = [actor.judge.remote(description, [prompts[i] for i in idx], [xs[i] for i in idx], [ys[i] for i in idx])
            for actor, idx in zip(actors, parts)]
    return [verdict for ref in refs for verdict in calls.wait(ref)]


def judge_stats(actors: list) -> dict | None:
    """Judgements asked for and those that did not fit the context, summed over the replicas (and each's)."""
    if not actors:
        return None
    each = ray.get([a.stats.remote() for a in actors])
    return {"judged": sum(s["judged"] for s in each), "too_long": sum(s["too_long"] for s in each), "replicas": each}

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

import csv
import json
from pathlib import Path
from typing import Callable

import ray

from rayuid import judges
from rayuid.config import TrainConfig, UserSpec
from rayuid.evaluation import greedy_replies, style_measures
from rayuid.plots import plt
from rayuid.prompts import Prompt, with_system_prompt
from rayuid.users import make_persona


def phase_at(user: UserSpec, step: int, switch_every: int | None) -> int:
    """Index into ``user.personas`` at ``step`` (0-based): the schedule advances every ``switch_every`` steps."""
    return 0 if len(user.personas) == 1 else min(step // switch_every, len(user.personas) - 1)


def persona_at(user: UserSpec, step: int, switch_every: int | None) -> str:
    return user.personas[phase_at(user, step, switch_every)]


def _key(persona: str, params: dict) -> str:
    return persona + "".join(f"|{k}={v}" for k, v in sorted(params.items()))


JudgeFn = Callable[[str, list[str], list[str]], list[str]]
"""(persona description, replies x, replies y) → "x" / "y" / "tie" per held-out prompt (``judges.judge_pairs``)."""


def measure(persona: str, params: dict, replies: list[str], base: list[str], judge: JudgeFn | None = None) -> dict:
    """Mean length; for checkable personas adherence and programmatic win rate vs base; with an LLM judge its win
    rate too (``judge_*``), which is also *the* win rate of personas no rule can check."""
    out, wr = style_measures(persona, params, replies, base)
    if wr is not None:
        out.update(win_rate=wr.rate, win_rate_se=wr.se, wins=wr.wins, losses=wr.losses, ties=wr.ties)
    if judge is not None:
        wr = judges.win_rate(judge(make_persona(persona, **params).description, replies, base))
        out.update(judge_win_rate=wr.rate, judge_win_rate_se=wr.se, judge_wins=wr.wins, judge_losses=wr.losses,
                   judge_ties=wr.ties)
        if "win_rate" not in out:
            out.update(win_rate=wr.rate, win_rate_se=wr.se, wins=wr.wins, losses=wr.losses, ties=wr.ties)
    return out


class PersonalEval:
    def __init__(self, cfg: TrainConfig, prompts: list[Prompt], options):
        self.cfg, self.prompts, self.options = cfg, prompts, options
        self.users = {u.id: u for u in cfg.online.users}
        self.rows: list[dict] = []
        self.base: list[str] | None = None
        self.oracle: dict[str, list[str]] = {}
        self.replies: dict[str, list[str]] = {}
        self.judge: JudgeFn | None = None
        self.judge_actor = None                       # the JudgeWorker behind ``judge`` (for its stats)
        self.phase_start: dict[str, list[str]] = {}   # "user/phase" → replies when that phase began

    def _greedy(self, system, tokenizer, prompts: list[Prompt], users: list[str | None]) -> list[str]:
        o, r = self.cfg.online, self.cfg.ray
        return greedy_replies(system, tokenizer, prompts, self.options, o.sampling.max_tokens, r.call_timeout_s,
                              r.max_restarts, users, o.unknown_user)

    def _connect_judge(self, system) -> None:
        """The LLM judge actor (``online.judge``), bound to the held-out prompts."""
        if getattr(system, "judge", None) is None:
            return
        self.judge_actor = system.judge
        prompts = [p.messages[-1]["content"] for p in self.prompts]
        timeout = self.cfg.ray.call_timeout_s
        self.judge = lambda desc, xs, ys: ray.get(system.judge.judge.remote(desc, prompts, xs, ys), timeout=timeout)

    def _baselines(self, system, tokenizer) -> None:
        self._connect_judge(system)
        n = len(self.prompts)
        self.base = self._greedy(system, tokenizer, self.prompts, [None] * n)
        if self.cfg.online.oracle:  # one oracle per distinct (persona, parameters)
            specs = {_key(p, u.persona_params(p)): (p, u.persona_params(p)) for u in self.users.values()
                     for p in u.personas}
            views = [with_system_prompt(p, make_persona(name, **params).description)
                     for name, params in specs.values() for p in self.prompts]
            texts = self._greedy(system, tokenizer, views, [None] * len(views))
            self.oracle = {key: texts[i * n: (i + 1) * n] for i, key in enumerate(specs)}

    def __call__(self, system, tokenizer, step: int, versions: dict[str, int]) -> list[dict]:
        """Evaluate every user's current adapter after ``step`` steps; returns the new rows."""
        if self.base is None:
            self._baselines(system, tokenizer)
        ids, o = list(self.users), self.cfg.online
        texts = self._greedy(system, tokenizer, self.prompts * len(ids), [u for u in ids for _ in self.prompts])
        n, rows = len(self.prompts), []
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
                   "judge": ray.get(self.judge_actor.stats.remote()) if self.judge_actor is not None else None,
                   "baselines": self.baselines(), "cross": self.cross(), "retention": self.retention(),
                   "samples": {"base": self.base[:3], **{u: r[:3] for u, r in self.replies.items()}}}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_csv(run_dir / "results.csv", self.rows)
        o = self.cfg.online
        plot(run_dir / "results.png", self.rows, results["baselines"],
             o.switch_every * o.prompts_per_step * o.sampling.n if o.switch_every else None, self.users)
        return results


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict], baselines: list[dict], switch_at: int | None, specs: dict) -> Path:
    """Per user: adherence (top) and win rate vs base (bottom) per persona; base and oracle dashed; grey lines
    where a user's persona switches (every ``switch_at`` interactions)."""
    users = list(dict.fromkeys(r["user"] for r in rows))
    fig, axes = plt.subplots(2, len(users), figsize=(4.4 * len(users), 6.0), squeeze=False)
    for col, uid in enumerate(users):
        personas = list(dict.fromkeys(r["persona"] for r in rows if r["user"] == uid and "win_rate" in r))
        for k, persona in enumerate(personas):
            mine = [r for r in rows if r["user"] == uid and r["persona"] == persona]
            xs, color = [r["interactions"] for r in mine], f"C{k}"
            if "adherence" in mine[0]:
                axes[0][col].plot(xs, [r["adherence"] for r in mine], marker="o", color=color, label=persona)
            axes[1][col].plot(xs, [r["win_rate"] for r in mine], marker="o", color=color, label=persona)
            for b in baselines:
                if b["user"] != uid or b["persona"] != persona:
                    continue
                style = ":" if b["system"] == "base" else "--"
                if "adherence" in b:
                    axes[0][col].axhline(b["adherence"], color=color, linestyle=style, linewidth=1,
                                         label=f"{persona} {b['system']}")
                if b["system"] == "oracle" and "win_rate" in b:
                    axes[1][col].axhline(b["win_rate"], color=color, linestyle="--", linewidth=1,
                                         label=f"{persona} oracle")
        axes[0][col].set_title(f"user {uid}: held-out adherence")
        axes[1][col].set_title(f"user {uid}: win rate vs base")
        axes[1][col].axhline(0.5, color="grey", linestyle=":", linewidth=1)
        for ax in axes[:, col]:
            ax.set_xlabel("this user's training interactions")
            ax.set_ylim(-0.05, 1.05)
            for i in range(1, len(specs[uid].personas) if switch_at else 0):
                ax.axvline(i * switch_at, color="grey", linewidth=0.8)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_table(results: dict) -> str:
    """Before/after per user and persona, the baselines, and (several users) the cross-adapter check."""
    rows = results["rows"]
    base = {(b["user"], b["persona"], b["system"]): b for b in results["baselines"]}
    uw = max([len(r["user"]) for r in rows] + [4]) + 2
    pw = max([len(r["persona"]) for r in rows] + [7]) + 2
    lines = [f"{'user':<{uw}}{'persona':<{pw}}{'base':>7}{'oracle':>8}{'start':>7}{'end':>7}{'win vs base':>20}"
             f"{'oracle win':>12}",
             "  (adherence on the held-out prompts; win rate = wins/(wins+losses) ± analytic SE)"]
    for key in dict.fromkeys((r["user"], r["persona"]) for r in rows if "win_rate" in r):
        mine = [r for r in rows if (r["user"], r["persona"]) == key]
        first, last, oracle = mine[0], mine[-1], base.get((*key, "oracle"), {})
        lines.append(f"{key[0]:<{uw}}{key[1]:<{pw}}{_f(base[(*key, 'base')].get('adherence')):>7}"
                     f"{_f(oracle.get('adherence')):>8}{_f(first.get('adherence')):>7}{_f(last.get('adherence')):>7}"
                     f"{last['win_rate']:>9.2f} ± {last['win_rate_se']:.2f} ({last['wins']}W/{last['losses']}L)"
                     f"{_f(oracle.get('win_rate')):>10}")
    if len({c["adapter"] for c in results["cross"]}) > 1:
        lines += ["", "cross-adapter check: each user's persona judges every adapter (adherence; own-adapter win rate)"]
        for c in results["cross"]:
            lines.append(f"  {c['judge_user']:<{uw}}judges {c['adapter']:<{uw}}adherence {_f(c['adherence'])}   "
                         f"own adapter wins {c['own_adapter_win_rate']:.2f}")
    for ret in results["retention"]:
        lines.append(f"retention {ret['user']}/{ret['persona']}: {ret['adherence_at_phase_end']:.2f} at the end of "
                     f"its phase (step {ret['phase_end_step']}) → {ret['adherence_at_end']:.2f} at the end")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"

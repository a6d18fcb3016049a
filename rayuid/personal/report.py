"""The per-user results as a person reads them: ``results.csv``, ``results.png`` and the text table."""

from __future__ import annotations

import csv
from pathlib import Path

from rayuid.records.plots import plt


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

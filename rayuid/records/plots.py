"""PNG plots of what a person would rather look at than a JSON file."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_metrics(records: list[dict], out: str | Path, keys: tuple[str, ...] = ("loss", "adv_mean", "adv_eos_mean")) -> Path:
    """One panel per metric against the optimizer step."""
    keys = tuple(k for k in keys if k in records[0])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r[key] for r in records], marker="o", ms=3)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_advantage_heatmap(tokens: list[str], rows: dict[str, list[float]], out: str | Path, title: str,
                           clip: tuple[float, float] = (-15.0, 3.0), per_line: int = 24) -> Path:
    """Per-token advantages as coloured text, one block per follow-up (paper Figs 7–8)."""
    import numpy as np

    lines = max(1, -(-len(tokens) // per_line))
    fig, axes = plt.subplots(len(rows), 1, figsize=(min(2 + per_line * 0.55, 16), 0.6 + 0.42 * lines * len(rows)),
                             squeeze=False)
    norm = matplotlib.colors.TwoSlopeNorm(vmin=clip[0], vcenter=0.0, vmax=clip[1])
    for ax, (label, values) in zip(axes[:, 0], rows.items()):
        grid = np.full((lines, per_line), np.nan)
        clipped = np.clip(np.asarray(values, dtype=float), *clip)
        grid.flat[: len(clipped)] = clipped
        ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
        for i, tok in enumerate(tokens):
            ax.text(i % per_line, i // per_line, tok.replace("\n", "⏎")[:8], ha="center", va="center", fontsize=6)
        ax.set_title(f"{label}: mean |A| = {np.mean(np.abs(values)):.3f}", fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)

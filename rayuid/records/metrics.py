"""``metrics.jsonl``: one JSON record per optimizer step, truncated to the resumed step on resume; each record (and
each held-out evaluation point) also goes to the run's experiment trackers (``rayuid.records.trackers``)."""

from __future__ import annotations

import json
from pathlib import Path

from rayuid.records.trackers import Trackers


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int, trackers: Trackers | None = None):
        self.path, self.trackers = path, trackers
        kept = []
        if resume_step and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record["step"], record)

    def evaluated(self, step: int, rows: list[dict]) -> None:
        """Held-out evaluation points after ``step`` steps: to the trackers under ``eval/`` (per user for per-user
        runs: ``eval/<user>/<persona>/…``); the run's own eval files hold them already."""
        if self.trackers is None:
            return
        for row in rows:
            where = "/".join(str(row[k]) for k in ("user", "persona") if k in row)
            self.trackers.log(step, row, prefix=f"eval/{where}/" if where else "eval/")

    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

"""Which interaction ids were trained at which step — the proof that faults neither lose nor repeat data.

Saved with every checkpoint and restored on resume, so the steps redone after a failure replace, not add to, the
record of the steps that were rolled back.
"""

from __future__ import annotations

from collections import Counter


class DuplicateInteractionError(RuntimeError):
    """An interaction id would be trained a second time."""


class Ledger:
    def __init__(self, steps: dict[int, list[str]] | None = None):
        self.steps: dict[int, list[str]] = {int(k): list(v) for k, v in (steps or {}).items()}

    def record(self, step: int, ids: list[str]) -> None:
        """Record the ids trained at ``step``; refuses ids trained at another step or twice in this one."""
        seen = {i for s, got in self.steps.items() if s != step for i in got}
        repeated = sorted(set(ids) & seen) + sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise DuplicateInteractionError(f"step {step} would train {len(repeated)} interaction(s) again, "
                                            f"e.g. {repeated[:3]}")
        self.steps[step] = list(ids)

    def rollback(self, last_kept_step: int) -> None:
        """Forget steps after a restored checkpoint (they will be redone)."""
        self.steps = {s: ids for s, ids in self.steps.items() if s <= last_kept_step}

    def counts(self) -> Counter:
        return Counter(i for ids in self.steps.values() for i in ids)

    def to_json(self) -> dict:
        return {str(k): v for k, v in sorted(self.steps.items())}

    @classmethod
    def from_json(cls, data: dict) -> "Ledger":
        return cls({int(k): v for k, v in data.items()})

"""Which interaction ids were trained at which step — the proof that faults neither lose nor repeat data.

Saved with every checkpoint and restored on resume: the restored ledger holds the steps up to that checkpoint only,
so the steps redone after a failure are recorded once, not added to the record of the steps that were rolled back.
"""

from __future__ import annotations

from collections import Counter


class DuplicateInteractionError(RuntimeError):
    """An interaction id would be trained a second time."""


class Ledger:
    """``steps``: step number → the interaction ids trained at that step, in the order they were trained.

    The driver (``rayuid.system.driver``) calls ``record(step + 1, ids)`` after each step's learn and publish, so the
    keys are 1-based step numbers, equal to the steps done (the checkpoint's step). Every policy writes ``to_json()``
    into its checkpoint's driver state and rebuilds the ledger with ``from_json`` on resume; the run's
    ``ledger.json`` and the summary's ``interactions_trained`` / ``interactions_trained_twice`` come from it
    (``counts``). Invariant kept by ``record``: no id appears twice, neither within a step nor across two steps;
    recording a step again replaces that step's ids. Interaction ids are deterministic (``s{step}-{slot}`` online,
    ``id@e{epoch}`` offline, so a second epoch is not a repeat). ``__init__`` / ``from_json`` take ``steps`` as
    given, unchecked: ``counts`` is what shows a repeat in a loaded ledger.
    """

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

    def counts(self) -> Counter:
        """How many times each id was trained, over all steps (1 everywhere in a ledger built by ``record``)."""
        return Counter(i for ids in self.steps.values() for i in ids)

    def to_json(self) -> dict:
        """``{"<step>": [ids]}`` in step order (JSON keys are strings); ``from_json`` reads it back."""
        return {str(k): v for k, v in sorted(self.steps.items())}

    @classmethod
    def from_json(cls, data: dict) -> "Ledger":
        return cls({int(k): v for k, v in data.items()})

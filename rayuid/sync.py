"""Weight-sync bookkeeping (pure): who must be at which version, and what counts as a finished publish.

Ordering invariant, enforced by the driver: learn(step t) → publish(v=t+1) → every engine reports (v, checksum) →
only then does step t+1 generate or score. A publish either completes on every engine or raises, naming the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SyncError(RuntimeError):
    """An engine loaded the wrong version or bytes, or did not answer in time."""


@dataclass
class PublishReport:
    version: int
    checksum: str
    num_bytes: int
    export_s: float = 0.0
    fanout_s: float = 0.0
    engines: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": self.version, "checksum": self.checksum, "bytes": self.num_bytes,
                "export_s": self.export_s, "fanout_s": self.fanout_s, "engines": dict(self.engines)}


def check_loaded(version: int, checksum: str, reports: dict[str, tuple[int, str]]) -> None:
    """Every engine must report exactly (version, checksum)."""
    wrong = {name: got for name, got in reports.items() if tuple(got) != (version, checksum)}
    if wrong:
        detail = ", ".join(f"{n} has v{v} ({c})" for n, (v, c) in sorted(wrong.items()))
        raise SyncError(f"weight sync to v{version} ({checksum}) failed: {detail}")


def timeout_error(version: int, pending: list[str], timeout_s: float) -> SyncError:
    return SyncError(
        f"weight sync to v{version} timed out after {timeout_s:.0f}s waiting for {', '.join(sorted(pending))}. "
        "The engine may be hung or out of memory: check its actor logs (ray logs / dashboard), and raise "
        "ray.sync_timeout_s if loading this model legitimately takes longer."
    )

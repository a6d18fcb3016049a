"""Weight-sync bookkeeping (pure): what counts as a finished publish, and the errors that name the engine at fault.

A publish (``rayuid.system.actors.weight_sync.WeightSyncActor``) either completes on every engine, each reporting
exactly the (version, checksum) published (``check_loaded``), or raises; a ``SyncError`` names the engine (or learner
rank) that loaded the wrong version or bytes, or did not answer in time.

Ordering, kept by the driver (``rayuid.system.driver``; steps counted from 0, v=0 the initial weights):
learn(step t) → publish(v=t+1) → every engine reports (v, checksum) → only then does step t+1 score, at v=t+1.
Whether step t+1 also *generates* after that publish depends on ``online.max_staleness``: with 0 (the default) it
does, so its replies come from v=t+1 too; with 1 (the most it may be) the replies of step t+1 are generated
while step t learns and publishes, so they come from v=t, one version behind (only generation overlaps: step t+1's
simulated user, scoring and learning still come after the publish). Every sample records the version that
generated it and the one that scored it (``gen_version``, ``score_version`` in ``samples.jsonl``). In a per-user run
each user's adapter has its own version, and a publish loads each user's new adapter, touching neither the base nor
any other user's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SyncError(RuntimeError):
    """An engine loaded the wrong version or bytes, or did not answer in time."""


FALLBACK = "object_store_fallback"
"""``PublishReport.via`` of a collective publish that failed part-way and went through the object store."""


@dataclass
class PublishReport:
    """One publish, its time split where it goes: the learner's gather + pack (``export_s``) and copy into the object
    store (``put_s``); getting the object to the engines (``transfer_s`` = the fan-out minus the slowest engine's own
    load); and vLLM's ``reload_weights`` inside the slowest engine (``reload_s``)."""

    version: int
    checksum: str
    num_bytes: int
    export_s: float = 0.0
    put_s: float = 0.0
    fanout_s: float = 0.0
    reload_s: float = 0.0
    engines: dict[str, int] = field(default_factory=dict)
    via: str = "object_store"
    """How the version reached the engines: object_store, collective, or object_store_fallback (a collective
    publish failed part-way and the same version went through the store)."""

    def to_json(self) -> dict:
        return {"version": self.version, "checksum": self.checksum, "bytes": self.num_bytes,
                "export_s": self.export_s, "put_s": self.put_s, "fanout_s": self.fanout_s,
                "transfer_s": max(self.fanout_s - self.reload_s, 0.0), "reload_s": self.reload_s,
                "engines": dict(self.engines), "via": self.via}


def check_loaded(version: int, checksum: str, reports: dict[str, tuple]) -> None:
    """Every engine must report exactly (version, checksum) (anything after those two is timing)."""
    wrong = {name: tuple(got)[:2] for name, got in reports.items() if tuple(got)[:2] != (version, checksum)}
    if wrong:
        detail = ", ".join(f"{n} has v{v} ({c})" for n, (v, c) in sorted(wrong.items()))
        raise SyncError(f"weight sync to v{version} ({checksum}) failed: {detail}")


def timeout_error(version: int, pending: list[str], timeout_s: float) -> SyncError:
    return SyncError(
        f"weight sync to v{version} timed out after {timeout_s:.0f}s waiting for {', '.join(sorted(pending))}. "
        "The engine may be hung or out of memory: check its actor logs (ray logs / dashboard), and raise "
        "ray.sync_timeout_s if loading this model legitimately takes longer."
    )

"""WeightSyncActor: owns the policy version and the order of a publish.

publish(): every learner rank takes part in gathering the full weights (or the LoRA adapter); rank 0 alone packs
them into one flat buffer (``rayuid.sdpo.weights``) and puts it in the object store as ONE object; the actor hands that
object to every inference engine, which reads it zero-copy on its node; each loads it and reports (version,
checksum); only when all match does publish return. Every wait has a timeout that names the
engine. A restarted engine is brought to the current version with ``sync_engine``.

With ``ray.weight_transfer: collective`` (``bucket_bytes`` set) full weights go through vLLM's weight-transfer API
instead (``rayuid.system.transport``): learner rank 0 broadcasts to every engine over NCCL or gloo, then each engine
reports (version, checksum of what it received). A restarted engine catches up through the object store with the
bytes last sent, and the group is formed anew (its size is fixed when formed). LoRA adapters always take the store.
"""

from __future__ import annotations

import logging
import time

import ray

from rayuid.system.sync import FALLBACK, PublishReport, check_loaded, timeout_error

DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
log = logging.getLogger(__name__)


class WeightSyncActor:
    """The one owner of "which version do the engines serve", started by ``rayuid.system.actors.spawn.build_system``
    (``num_cpus=0``) and called by the driver only through ``rayuid.system.calls.Calls``: ``publish`` /
    ``publish_adapters`` after each learn, ``resume_at`` + ``publish`` on restore, ``set_learners`` after the learner
    group was rebuilt, ``current``, and ``sync_engine`` when a call met a dead engine.

    Holds the learner handles (rank order) and the engines (name → handle); ``version`` / ``checksum``: the last
    publish every engine confirmed (the next one is ``version + 1``; ``resume_at`` sets it after a restore, so the
    checkpoint's weights are republished under their own version); ``blob_ref``: the object-store reference of
    the buffer published last, kept so that an engine Ray restarts (back at version 0) can be reloaded with it;
    ``adapters``: per-user runs, each user's served adapter as [ref, checksum, bytes, version]; ``serve_dtype``: the
    dtype the learner packs weights in (the engines' shared dtype, or None). Invariant: ``version`` advances only
    after every engine reported exactly (version, checksum) (``rayuid.system.sync.check_loaded``); otherwise the
    call raises, and a wait that runs out raises a ``SyncError`` naming the late engine or learner rank.
    """

    def __init__(self, learners: list, engines: dict, timeout_s: float = 300.0, version: int = 0,
                 serve_dtype: str | None = None, bucket_bytes: int | None = None, shared_gpu: bool = False):
        self.learners = learners
        self.serve_dtype = serve_dtype  # what every engine computes in: the learner packs in it (None: as trained)
        self.engines = dict(engines)
        self.timeout_s = timeout_s
        self.version = version
        self.blob_ref = None
        self.checksum = ""
        self.adapters: dict[str, list] = {}  # user → [ObjectRef, checksum, bytes, version] of the served adapter
        self.bucket_bytes = bucket_bytes     # set: full weights go through the collective transport
        self.group_open = False              # the learner's transfer group with every engine is formed
        self.group_pids: dict = {}           # engine → pid when the group formed (a restart means a new group)
        self.shared_gpu = shared_gpu         # engines on the learner's GPU: vLLM's ipc backend on CUDA

    def publish(self) -> dict:
        """Version + 1: every learner rank exports (rank 0 packs and puts ONE object), every engine loads it and
        reports (version, checksum); returns the ``PublishReport`` with the time of each part."""
        if self.bucket_bytes is not None:
            return self._publish_collective()
        return self._publish_store(self.version + 1)

    def _publish_store(self, version: int) -> dict:
        """``version`` through the object store: every rank exports, rank 0 puts one object, every engine loads it."""
        exports = self._wait({f"learner{r}": l.export_weights.remote(version, self.serve_dtype)
                              for r, l in enumerate(self.learners)}, version)
        out = exports["learner0"]  # {ref, checksum, bytes, export_s, put_s} from rank 0 only
        self.blob_ref = out["ref"]
        t1 = time.perf_counter()
        reports = self._load(list(self.engines), version)
        fanout_s = time.perf_counter() - t1
        check_loaded(version, out["checksum"], reports)
        self.version, self.checksum = version, out["checksum"]
        report = PublishReport(version, out["checksum"], out["bytes"], out["export_s"], out["put_s"], fanout_s,
                               max(r[2] for r in reports.values()), {n: r[0] for n, r in reports.items()})
        return report.to_json()

    def _publish_collective(self) -> dict:
        """Version + 1 over vLLM's weight-transfer API: every rank gathers, rank 0 broadcasts to every engine (the
        group is formed on first use and after an engine restart); then every engine reports (version, checksum of
        what it received), which must equal what the learner sent."""
        version = self.version + 1
        t0 = time.perf_counter()
        if self.group_open and self._engine_pids() != self.group_pids:  # an engine restarted since it formed
            self._close_group(ignore_errors=True)
        try:
            self._open_group()
            exports = self._wait({f"learner{r}": l.send_weights.remote(version, self.serve_dtype)
                                  for r, l in enumerate(self.learners)}, version)
        except (ray.exceptions.RayTaskError, *DIED) as err:  # e.g. an engine died mid-broadcast (gloo: at once;
            # NCCL: a dead peer may hang the broadcast until the group's timeout — then this is a SyncError)
            return self._publish_through_store(version, err)
        out = exports["learner0"]
        reports = self._wait({n: e.served.remote() for n, e in self.engines.items()}, version)
        check_loaded(version, out["checksum"], reports)
        self.version, self.checksum, self.blob_ref = version, out["checksum"], None
        report = PublishReport(version, out["checksum"], out["bytes"], out["export_s"], 0.0,
                               time.perf_counter() - t0 - out["export_s"], 0.0, {n: r[0] for n, r in reports.items()},
                               via="collective")
        return report.to_json()

    def _publish_through_store(self, version: int, err: BaseException) -> dict:
        """A collective publish failed part-way: drop the group, then give every engine (restarted ones included)
        the same version through the object store, checked as always; the group is formed anew next time."""
        log.warning("collective publish of v%d failed (%s); publishing it through the object store", version,
                    str(err).splitlines()[0][:200])
        t0 = time.perf_counter()
        self._close_group(ignore_errors=True)
        self.blob_ref, checksum, num_bytes, sent_version = ray.get(self.learners[0].last_sent.remote(),
                                                                   timeout=self.timeout_s)
        if sent_version != version:  # the failure came before rank 0 packed this version: export it now
            return {**self._publish_store(version), "via": FALLBACK}
        reports = self._load(list(self.engines), version)
        check_loaded(version, checksum, reports)
        self.version, self.checksum = version, checksum
        return PublishReport(version, checksum, num_bytes, 0.0, 0.0, time.perf_counter() - t0, 0.0,
                             {n: r[0] for n, r in reports.items()}, via=FALLBACK).to_json()

    def _open_group(self) -> None:
        if self.group_open:
            return
        lead = self.learners[0]
        address, port = ray.get([lead.node_ip.remote(), lead.free_port.remote()], timeout=self.timeout_s)
        self._wait({"learner0": lead.open_transport.remote(self.engines, address, port, self.bucket_bytes,
                                                           self.timeout_s, self.shared_gpu)}, self.version + 1)
        self.group_open, self.group_pids = True, self._engine_pids()

    def _engine_pids(self) -> dict:
        """Each engine's process id, waiting for one that Ray is restarting (a new pid: a new group)."""
        pids = {}
        for name, engine in self.engines.items():
            try:
                pids[name] = ray.get(engine.pid.remote(), timeout=self.timeout_s)
            except DIED:
                self._wait_alive(name)
                pids[name] = ray.get(engine.pid.remote(), timeout=self.timeout_s)
        return pids

    def _close_group(self, ignore_errors: bool = False, learner: bool = True) -> None:
        """A group's size is fixed when it is formed: after an engine restart it is formed anew at the next publish.
        ``ignore_errors``: after a failed transfer, members that died or hold a broken group are skipped."""
        if not self.group_open:
            return
        self.group_open = False
        refs = {n: e.transfer_close.remote() for n, e in self.engines.items()}
        if learner:  # (a rebuilt learner group holds no transfer group)
            refs["learner0"] = self.learners[0].close_transport.remote()
        if not ignore_errors:
            self._wait(refs, self.version)
            return
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        for ref in refs.values():
            try:
                ray.get(ref, timeout=0)
            except Exception as err:  # noqa: BLE001 - a dead or broken member: it rejoins through the store
                log.warning("closing the transfer group: %s", str(err).splitlines()[0][:200])

    def publish_adapters(self, owners: dict[str, int]) -> dict:
        """Per-user publish: ``owners`` maps each user to the index of the learner that trains it. Every engine loads
        each user's new adapter version; no other user's adapter (nor the base) is touched."""
        t0 = time.perf_counter()
        exports = self._wait({u: self.learners[i].export_adapter.remote(u) for u, i in owners.items()}, -1)
        self.adapters.update(exports)
        dead = self._load_adapters(list(owners), list(self.engines))
        for name in dead:  # restarted by Ray meanwhile: it gets every user's adapter, once
            self._wait_alive(name)
            self._load_adapters(list(self.adapters), [name], retry=False)
        return {"users": {u: e[3] for u, e in exports.items()}, "bytes": sum(e[2] for e in exports.values()),
                "seconds": time.perf_counter() - t0}

    def _load_adapters(self, users: list[str], names: list[str], retry: bool = True) -> set[str]:
        """All (user, engine) loads submitted at once and checked; returns the engines that died meanwhile."""
        refs = {(u, n): self.engines[n].load_adapter.remote(u, self.adapters[u][0]) for u in users for n in names}
        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            late = sorted({n for (_, n), r in refs.items() if r in pending})
            raise timeout_error(-1, late, self.timeout_s)
        dead = set()
        for (user, name), ref in refs.items():
            _, checksum, _, version = self.adapters[user]
            try:
                check_loaded(version, checksum, {name: ray.get(ref)})
            except DIED:
                if not retry:
                    raise
                dead.add(name)
        return dead

    def sync_engine(self, name: str) -> int:
        """Load the current version (and every user's adapter) into one (e.g. restarted) engine; returns the
        version it now serves."""
        self._wait_alive(name)
        if self.adapters:
            self._load_adapters(list(self.adapters), [name], retry=False)
        collective = self.bucket_bytes is not None
        if (self.blob_ref is None and not collective) or (collective and not self.checksum):
            return 0  # nothing published yet: the restarted engine's initial weights are current
        checksum = self.checksum
        if collective:  # catch up through the object store: the exact bytes last sent (checked by their XXH3; what
            # a GPU engine reported after a collective publish was a Digest of the same tensors)
            self.blob_ref, checksum, _, _ = ray.get(self.learners[0].last_sent.remote(), timeout=self.timeout_s)
        check_loaded(self.version, checksum, self._load([name], self.version))
        if collective:
            self._close_group()
        return self.version

    def _load(self, names: list[str], version: int) -> dict:
        """Fan the current blob out; an engine that dies meanwhile is reloaded once Ray has restarted it."""
        refs = {n: self.engines[n].load_weights.remote(self.blob_ref) for n in names}
        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            raise timeout_error(version, [n for n, r in refs.items() if r in pending], self.timeout_s)
        reports = {}
        for name, ref in refs.items():
            try:
                reports[name] = ray.get(ref)
            except DIED:
                self._wait_alive(name)
                reports[name] = ray.get(self.engines[name].load_weights.remote(self.blob_ref), timeout=self.timeout_s)
        return reports

    def _wait_alive(self, name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray.get(self.engines[name].version.remote(), timeout=self.timeout_s)
                return
            except DIED:
                if time.monotonic() > deadline:
                    raise timeout_error(self.version, [name], self.timeout_s) from None
                time.sleep(0.5)

    def resume_at(self, version: int) -> None:
        """After a restore: the next publish is ``version + 1``."""
        self.version = version

    def set_learners(self, learners: list) -> None:
        """After the learner group was rebuilt (a new rank 0 holds no transfer group: it is formed again)."""
        self.learners = learners
        self._close_group(ignore_errors=True, learner=False)

    def current(self) -> dict:
        return {"version": self.version, "checksum": self.checksum}

    def _wait(self, refs: dict, version: int) -> dict:
        names = {ref: name for name, ref in refs.items()}
        ready, pending = ray.wait(list(names), num_returns=len(names), timeout=self.timeout_s)
        if pending:
            raise timeout_error(version, [names[r] for r in pending], self.timeout_s)
        return {names[r]: ray.get(r) for r in ready}

"""The one place that applies ``ray.remote``: connect to Ray, reserve resources, start every actor.

Resources come from the job config (``ray:`` block): a single placement group holds one bundle per learner rank,
per inference engine and (if it needs resources) for the user simulator, so a job either gets everything it asked
for or fails with a message that says what was missing.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from rayuid import logs
from rayuid.config import Resources, TrainConfig
from rayuid.records import storage
from rayuid.records.storage import RunDir
from rayuid.system import capacity, transport
from rayuid.system.actors.adapter_learner import AdapterLearnerWorker
from rayuid.system.actors.inference import RolloutWorker, ScoringWorker, SharedEngineWorker, start_engine
from rayuid.system.actors.judge import JudgeWorker
from rayuid.system.actors.learner import LearnerWorker
from rayuid.system.actors.user import UserSimulatorWorker
from rayuid.system.actors.weight_sync import WeightSyncActor

log = logging.getLogger(__name__)
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
# glibc malloc: serve big blocks from the heap and keep freed memory, so the activations of every learner step and
# the tensors vLLM's reload allocates reuse pages instead of page-faulting fresh ones (measured on SmolLM2 here:
# learner step 7.2 -> 5.6 s, vLLM reload 0.25 -> 0.16 s, generation unchanged). The cost: an actor's RSS stays at
# its peak. Set either variable yourself to override.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def actor_env() -> dict[str, str]:
    """Environment variables every actor starts with: in-process vLLM, and the run's verbosity."""
    allocator = {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}
    return {**ACTOR_ENV, **allocator, **logs.actor_env()}


class ClusterError(RuntimeError):
    """Ray could not be reached or could not provide the requested resources."""


def connect(address: str | None, num_cpus: int | None) -> None:
    """Join ``address`` / RAY_ADDRESS (e.g. under `ray job submit`), or start a local single-node Ray."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target and not _reachable(target):
        raise ClusterError(f"no Ray cluster answers at {target!r} (TCP connect failed). Start one with "
                           "`ray start --head`, fix ray.address / RAY_ADDRESS, or remove both to run on a local "
                           "single-node Ray.")
    try:
        if target:
            ray.init(address=target, logging_level=logs.ray_level())
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logs.ray_level())
    except (ConnectionError, RuntimeError, ValueError, SystemExit) as err:
        raise ClusterError(
            f"could not connect to the Ray cluster at {target!r}: {err}. Start one with `ray start --head`, pass its "
            "address (ray.address=... or RAY_ADDRESS), or remove ray.address to run on a local single-node Ray. "
            "Ray 2.60 heads use token auth by default: set RAY_AUTH_MODE=token on the client."
        ) from err


def _reachable(address: str, timeout_s: float = 5.0) -> bool:
    """A quick TCP probe so a wrong address fails in seconds, not after Ray's minutes of retries."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return True
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=timeout_s):
            return True
    except OSError:
        return False


def run_tag(cfg: TrainConfig) -> str:
    """Actor-name prefix unique to a run directory (names let operators and tests find an engine)."""
    import hashlib

    return "rayuid-" + hashlib.sha1(storage.join(cfg.run_dir).encode()).hexdigest()[:8]


@ray.remote(num_cpus=0)
def _write_probe(folder: str, name: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / name).write_text(name)


def check_shared_run_dir(records: RunDir, timeout_s: float = 60.0) -> None:
    """A local ``run_dir`` on a multi-node cluster must be storage every node mounts (learners and adapter
    learners write checkpoints on their node, the driver lists and resumes them on its own): every other node
    writes a marker into it and the driver reads them back. A URI run_dir needs no check."""
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if records.remote or not others:
        return
    probe = records.local / f".shared-probe-{os.getpid()}-{time.time_ns()}"
    try:
        ray.get([_write_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                 .remote(str(probe), n) for n in others], timeout=timeout_s)
        missing = [n[:12] for n in others if not (probe / n).exists()]
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if missing:
        raise ClusterError(f"run_dir {records.location!r} is a local folder that node(s) {missing} do not share "
                           f"with the driver's node, so checkpoints written there could never be resumed: set "
                           "run_dir to a URI (s3://bucket/prefix, gs://…) or to a path every node mounts (NFS, a "
                           "ReadWriteMany volume)")


def _bundle(res: Resources) -> dict:
    return {k: v for k, v in (("CPU", res.num_cpus), ("GPU", res.num_gpus), *res.resources.items()) if v > 0}


def engine_names(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(rollout engine names, teacher engine names); shared engines appear in both."""
    rollout = [f"engine{i}" for i in range(cfg.ray.rollout_workers)]
    teacher = [f"teacher{i}" for i in range(cfg.ray.teacher_workers)] or list(rollout)
    return rollout, teacher


def plan_bundles(cfg: TrainConfig, needs_user_engine: bool) -> list[tuple[str, dict]]:
    """Pure: (actor name, resource bundle) for everything the job starts, learners first."""
    r = cfg.ray
    rollout, teacher = engine_names(cfg)
    plan = [(f"learner{i}", _bundle(r.learner)) for i in range(r.learners)]
    plan += [(name, _bundle(r.engine)) for name in dict.fromkeys(rollout + teacher)]
    if needs_user_engine or _bundle(r.user):
        plan += [(f"user{i}", _bundle(capacity.user_resources(r))) for i in range(r.user_workers)]
    if cfg.online is not None and cfg.online.judge is not None:
        plan += [(f"judge{i}", _bundle(r.judge)) for i in range(r.judge_workers)]
    empty = [name for name, b in plan if not b]
    if empty:
        raise ClusterError(f"actors {empty} were given no CPU or GPU; give every role num_cpus > 0 or num_gpus > 0")
    return plan


@dataclass
class System:
    """Every actor of one run, as ``build_system`` started them; the driver reaches them through
    ``rayuid.system.calls.Calls`` (``Calls.system``) and ends them with ``shutdown``.

    learners: the learner handles in rank order (``LearnerWorker``, or ``AdapterLearnerWorker`` in a per-user run);
        after a learner died the policy builds a new ``System`` with fresh ones (``dataclasses.replace``).
    engines: name → handle of every inference engine, rollout (``engine{i}``) and teacher (``teacher{i}``); a shared
        engine (``teacher_workers: 0``) is in it once. Ray restarts them (``ray.max_restarts``).
    rollout, teacher: the engine names that generate, and those that score (the rollout names when the teacher
        shares them), in the order the driver shards a batch over them.
    sync: the ``WeightSyncActor``. users: the user simulator replicas (``ray.user_workers``; none in an offline
        run). judges: the LLM judge replicas (``ray.judge_workers``; none unless ``online.judge``).
    pg: the one placement group holding every bundle (the sync actor, and a user simulator given no resources, run
        outside it with ``num_cpus=0``); bundle_of: actor name → (bundle index, bundle) in ``pg``, as planned by
        ``plan_bundles`` (replacement learners start in their predecessors' bundles).
    """

    learners: list
    engines: dict
    rollout: list[str]
    teacher: list[str]
    sync: object
    users: list
    pg: object
    bundle_of: dict = field(default_factory=dict)
    judges: list = field(default_factory=list)
    precision: dict = field(default_factory=dict)
    """Per role, the dtypes it decided (``auto`` is decided on each actor's node) and the hardware it saw."""
    transfer: str = "object_store"
    """How full weights reach the engines (``rayuid.system.transport.mode``): object_store or collective."""

    def shutdown(self) -> None:
        for handle in [*self.learners, *self.engines.values(), self.sync, *self.users, *self.judges]:
            ray.kill(handle, no_restart=True)
        remove_placement_group(self.pg)


def _options(pg, index: int, bundle: dict, **extra) -> dict:
    """Actor options: its bundle of the placement group, and env vars merged into the job's runtime env."""
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return dict(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom,
                scheduling_strategy=strategy, runtime_env={"env_vars": actor_env()}, **extra)


def _on_driver_node() -> dict:
    """Options of an actor that needs no resources of its own (the weight-sync actor, a rule-based user
    simulator): on the driver's node, so losing a worker node never takes it along."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return dict(num_cpus=0, scheduling_strategy=here, runtime_env={"env_vars": actor_env()})


def placement(system: System) -> dict[str, str]:
    """Role → id of the node it runs on (the summary's ``nodes``): each bundle's node, and the driver's."""
    table = ray.util.placement_group_table(system.pg)["bundles_to_node_id"]
    return {"driver": ray.get_runtime_context().get_node_id(),
            **{name: table[index] for name, (index, _) in system.bundle_of.items()}}


def reserve(cfg: TrainConfig, plan: list[tuple[str, dict]]):
    pg = placement_group([b for _, b in plan], strategy=cfg.ray.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=cfg.ray.call_timeout_s)
    if not ready:
        need = {k: sum(b.get(k, 0) for _, b in plan) for k in ("CPU", "GPU")}
        remove_placement_group(pg)
        raise ClusterError(f"the cluster could not provide {need} for {len(plan)} actors within "
                           f"{cfg.ray.call_timeout_s:.0f}s (it has {ray.cluster_resources()}). Lower the ray.* "
                           "resources, or add nodes / let the autoscaler add them.")
    return pg


def start_learners(cfg: TrainConfig, pg, bundle_of: dict, total_steps: int) -> list:
    """Learner ranks; rank 0 picks the rendezvous port on its own node, every rank joins it."""
    cls = ray.remote(LearnerWorker)
    n = cfg.ray.learners
    learners = [cls.options(**_options(pg, *bundle_of[f"learner{i}"], max_restarts=0,
                                       name=f"{run_tag(cfg)}-learner{i}-{time.monotonic_ns()}"))
                .remote(cfg.model_dump(mode="json"), i, n, total_steps) for i in range(n)]
    addr, port = _started(cfg, [learners[0].node_ip.remote(), learners[0].free_port.remote()], learners)
    _started(cfg, [l.setup.remote(addr, port) for l in learners], learners)
    return learners


def _started(cfg: TrainConfig, refs: list, handles: list) -> list:
    """``ray.get`` of new actors' first calls; they wait for their bundles, which wait for a node that can hold
    them (after a node was lost: until one with its resources joins, e.g. brought up by the autoscaler). On any
    failure the new actors are killed before the error propagates."""
    try:
        return ray.get(refs, timeout=cfg.ray.call_timeout_s)
    except BaseException as err:
        for handle in handles:
            ray.kill(handle, no_restart=True)
        if not isinstance(err, ray.exceptions.GetTimeoutError):
            raise
        dead = [n["NodeID"][:12] for n in ray.nodes() if not n["Alive"]]
        lost = f": node(s) {dead} left the cluster and no node with their resources joined" if dead else ""
        raise ClusterError(f"the learners did not start within ray.call_timeout_s={cfg.ray.call_timeout_s:.0f}s"
                           f"{lost}; re-submit the job: it resumes from the last checkpoint in {cfg.run_dir}") from err


def start_adapter_learners(cfg: TrainConfig, pg, bundle_of: dict, total_steps: int) -> list:
    """Per-user runs: independent adapter learners (no process group), each owning a share of the users."""
    cls = ray.remote(AdapterLearnerWorker)
    learners = [cls.options(**_options(pg, *bundle_of[f"learner{i}"], max_restarts=0,
                                       name=f"{run_tag(cfg)}-learner{i}-{time.monotonic_ns()}"))
                .remote(cfg.model_dump(mode="json"), total_steps) for i in range(cfg.ray.learners)]
    _started(cfg, [l.ready.remote() for l in learners], learners)
    return learners


def restart_learners(cfg: TrainConfig, system: System, total_steps: int) -> list:
    """Kill what is left of the learners (a broken group, or adapter learners of a per-user run that lost one) and
    start fresh ones in their bundles (waiting, up to ray.call_timeout_s, for a node that can hold them)."""
    for handle in system.learners:
        ray.kill(handle, no_restart=True)
    return start_learner_group(cfg, system.pg, system.bundle_of, total_steps)


def start_learner_group(cfg: TrainConfig, pg, bundle_of: dict, total_steps: int) -> list:
    """The learners of this run (adapter learners for a per-user run), started again while a new one dies before it
    ran: placed on a node that is going away (a lost node misses heartbeats for a while; an autoscaler drains an
    idle one) its bundle moves to a live node once Ray has declared that one dead. Up to ray.call_timeout_s."""
    start = start_adapter_learners if per_user(cfg) else start_learners
    deadline = time.monotonic() + cfg.ray.call_timeout_s
    while True:
        try:
            return start(cfg, pg, bundle_of, total_steps)
        except ray.exceptions.RayActorError as err:
            if time.monotonic() > deadline:
                raise
            log.warning("a new learner died on start (%s); starting it again", str(err).splitlines()[-1])
            time.sleep(5)


def per_user(cfg: TrainConfig) -> bool:
    """A per-user run (``online.users``): adapter learners, no process group."""
    return cfg.online is not None and bool(cfg.online.users)


def _start_engines(cfg: TrainConfig, pg, bundle_of: dict, transfer: str) -> tuple[dict, list[str], list[str]]:
    rollout, teacher = engine_names(cfg)
    settings = cfg.ray.vllm.model_dump(mode="json")
    lora = cfg.model.lora is not None
    engines = {}
    for i, name in enumerate(dict.fromkeys(rollout + teacher)):
        cls = SharedEngineWorker if (name in rollout and name in teacher) else (
            RolloutWorker if name in rollout else ScoringWorker)
        opts = _options(pg, *bundle_of[name], max_restarts=cfg.ray.max_restarts, max_task_retries=0,
                        name=f"{run_tag(cfg)}-{name}")
        threads = cfg.ray.engine.num_threads()
        engines[name] = ray.remote(cls).options(**opts).remote(cfg.model.name, settings, lora, cfg.seed + i, threads,
                                                               _engine_transfer(cfg, transfer))
    return engines, rollout, teacher


def _engine_transfer(cfg: TrainConfig, transfer: str) -> str | None:
    """What an engine prepares for: None (object store), collective, or collective on the learner's own GPU."""
    if transfer != "collective":
        return None
    return "collective-shared-gpu" if transport.shares_gpu(cfg) else "collective"


def _start_user(cfg: TrainConfig, pg, bundle_of: dict, i: int):
    user = cfg.online.user
    factory = None
    if user.kind == "llm":
        settings = (cfg.ray.user_vllm or cfg.ray.vllm).model_dump(mode="json")
        factory = functools.partial(start_engine, user.model or cfg.model.name, settings, False, cfg.seed,
                                    cfg.ray.user.num_threads())
    opts = _options(pg, *bundle_of[f"user{i}"]) if f"user{i}" in bundle_of else _on_driver_node()
    opts.update(max_restarts=cfg.ray.max_restarts, max_task_retries=0)
    params = {**user.params, "max_tokens": user.max_tokens, "temperature": user.temperature}
    return ray.remote(UserSimulatorWorker).options(**opts).remote(user.kind, user.persona, params, factory)


def _start_judge(cfg: TrainConfig, pg, bundle_of: dict, i: int):
    judge = cfg.online.judge
    settings = (cfg.ray.judge_vllm or cfg.ray.vllm).model_dump(mode="json")
    settings["max_model_len"] = judge.max_model_len or settings["max_model_len"]
    opts = _options(pg, *bundle_of[f"judge{i}"], max_restarts=cfg.ray.max_restarts, max_task_retries=0,
                    name=f"{run_tag(cfg)}-judge{i}")
    return ray.remote(JudgeWorker).options(**opts).remote(judge.model or cfg.model.name, settings, judge.max_tokens,
                                                           cfg.seed, cfg.ray.judge.num_threads())


def _wait_ready(engines: dict, timeout_s: float) -> None:
    for name, handle in engines.items():
        try:
            ray.get(handle.version.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
            raise ClusterError(f"inference engine {name} failed to start: {err}") from err


def build_system(cfg: TrainConfig, total_steps: int) -> System:
    """Start every actor and wait until each is ready; errors name the role that failed."""
    needs_user_engine = cfg.online is not None and cfg.online.user.kind == "llm"
    plan = plan_bundles(cfg, needs_user_engine)
    if misfits := capacity.problems(cfg):
        raise ClusterError("these roles do not fit their GPUs: " + "; ".join(misfits))
    pg = reserve(cfg, plan)
    bundle_of = {name: (i, b) for i, (name, b) in enumerate(plan)}
    learners = start_learner_group(cfg, pg, bundle_of, total_steps)
    transfer = transport.mode(cfg)
    log.info("weight transfer: %s", transfer)
    engines, rollout, teacher = _start_engines(cfg, pg, bundle_of, transfer)
    users = [_start_user(cfg, pg, bundle_of, i) for i in range(cfg.ray.user_workers)] if cfg.online is not None else []
    judges = [_start_judge(cfg, pg, bundle_of, i) for i in range(cfg.ray.judge_workers) if f"judge{i}" in bundle_of]
    _wait_ready({**engines, **{f"judge{i}": j for i, j in enumerate(judges)}}, cfg.ray.call_timeout_s)
    decided = actor_precision(learners, engines, cfg.ray.call_timeout_s)
    bucket = cfg.ray.transfer_bucket_bytes if transfer == "collective" else None
    sync = ray.remote(WeightSyncActor).options(**_on_driver_node()).remote(learners, engines, cfg.ray.sync_timeout_s,
                                                                  serve_dtype=serve_dtype(decided), bucket_bytes=bucket,
                                                                  shared_gpu=transport.shares_gpu(cfg))
    return System(learners, engines, rollout, teacher, sync, users, pg, bundle_of, judges, decided, transfer)


def actor_precision(learners: list, engines: dict, timeout_s: float) -> dict:
    """What each learner rank and engine decided its dtypes to be, on its own node (for the summary)."""
    names = [f"learner{i}" for i in range(len(learners))] + list(engines)
    refs = [h.precision.remote() for h in [*learners, *engines.values()]]
    return dict(zip(names, ray.get(refs, timeout=timeout_s)))


def serve_dtype(decided: dict) -> str | None:
    """Pure: the dtype all engines compute in (the learner packs published weights in it), None if they differ."""
    dtypes = {p["dtype"] for name, p in decided.items() if not name.startswith("learner")}
    return dtypes.pop() if len(dtypes) == 1 else None

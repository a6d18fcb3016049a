"""Pure helpers that had no tests (bundle plan, shards, ledger, sync checks), and ``Calls``' retries on real actors.

The ``Calls`` tests start a local Ray (``local_ray``) and tiny plain actors defined here: an engine and a user
simulator that ``os._exit`` on their first call (a marker file says whether they already did), and a fake
WeightSyncActor that only records which engine it was asked to bring up to date.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from rayuid.config import load_config
from rayuid.records.ledger import DuplicateInteractionError, Ledger
from rayuid.system.actors.spawn import ClusterError, plan_bundles
from rayuid.system.calls import ACTOR_DIED, Calls
from rayuid.system.phases import shard
from rayuid.system.sync import PublishReport, SyncError, check_loaded, timeout_error

RAY_UP_AFTER_IMPORTS = ray.is_initialized()
SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
HALF = {"CPU": 0.5}  # every role's bundle in jobs/smoke.yaml
# Ray workers cannot import this test module: ship the actor classes below by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cfg(*overrides):
    return load_config(SMOKE, ["run_dir=/nonexistent/unused", *overrides])


# --- rayuid.system.actors.spawn.plan_bundles ---------------------------------------------------------------------


def test_importing_spawn_does_not_start_ray():
    assert RAY_UP_AFTER_IMPORTS is False


def test_plan_two_learners_one_rollout_one_teacher():
    cfg = _cfg("ray.learners=2", "ray.rollout_workers=1", "ray.teacher_workers=1")
    assert plan_bundles(cfg, needs_user_engine=False) == [
        ("learner0", HALF), ("learner1", HALF), ("engine0", HALF), ("teacher0", HALF)]


def test_plan_shared_engines_appear_once():
    cfg = _cfg("ray.rollout_workers=2", "ray.teacher_workers=0")
    assert plan_bundles(cfg, False) == [("learner0", HALF), ("engine0", HALF), ("engine1", HALF)]


def test_plan_user_bundle_only_when_needed():
    cfg = _cfg()  # rule-based user, ray.user.num_cpus = 0 (the default)
    assert [name for name, _ in plan_bundles(cfg, False)] == ["learner0", "engine0"]
    # an LLM user needs an engine: it gets ray.user's bundle, or ray.engine's when ray.user asks for nothing
    assert plan_bundles(cfg, True)[-1] == ("user0", HALF)
    own = _cfg("ray.user.num_cpus=0.25")
    assert plan_bundles(own, True)[-1] == ("user0", {"CPU": 0.25})
    assert plan_bundles(own, False)[-1] == ("user0", {"CPU": 0.25})  # resources asked for: reserved either way
    two = _cfg("online.user={kind: llm}", "ray.user_workers=2")
    assert plan_bundles(two, True)[-2:] == [("user0", HALF), ("user1", HALF)]          # one bundle per replica


def test_plan_judge_bundle_comes_last():
    cfg = _cfg("online.judge={}", "ray.judge.num_cpus=0", "ray.judge.num_gpus=1")
    assert plan_bundles(cfg, True) == [("learner0", HALF), ("engine0", HALF), ("user0", HALF),
                                       ("judge0", {"GPU": 1.0})]
    assert [name for name, _ in plan_bundles(_cfg(), True)] == ["learner0", "engine0", "user0"]  # no judge asked
    two = _cfg("online.judge={}", "ray.judge_workers=2")
    assert [name for name, _ in plan_bundles(two, True)][-2:] == ["judge0", "judge1"]


def test_plan_gpus_and_custom_resources_zero_entries_dropped():
    cfg = _cfg("ray.engine.num_cpus=0", "ray.engine.num_gpus=1", "ray.learner.resources={learner: 0.01}")
    assert plan_bundles(cfg, False) == [("learner0", {"CPU": 0.5, "learner": 0.01}), ("engine0", {"GPU": 1.0})]


def test_plan_offline_run_has_no_user_or_judge():
    # build_system passes needs_user_engine=False when there is no online block; no judge without one either
    assert plan_bundles(_cfg("online="), False) == [("learner0", HALF), ("engine0", HALF)]


@pytest.mark.parametrize("overrides, needs_user, empty", [
    (["ray.engine.num_cpus=0", "ray.rollout_workers=2", "ray.teacher_workers=1"], False,
     "['engine0', 'engine1', 'teacher0']"),
    (["ray.learner.num_cpus=0", "ray.learners=2"], False, "['learner0', 'learner1']"),
    (["ray.engine.num_cpus=0"], True, "['engine0', 'user0']"),  # the user falls back to the empty engine bundle
    (["online.judge={}", "ray.judge.num_cpus=0"], False, "['judge0']"),
])
def test_plan_role_without_cpu_or_gpu_is_named(overrides, needs_user, empty):
    with pytest.raises(ClusterError) as err:
        plan_bundles(_cfg(*overrides), needs_user)
    assert str(err.value) == (f"actors {empty} were given no CPU or GPU; give every role num_cpus > 0 or "
                              "num_gpus > 0")


# --- rayuid.system.phases.shard ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", range(8))
@pytest.mark.parametrize("n", range(1, 5))
def test_shard_contiguous_near_equal_in_order(length, n):
    items = [f"x{i}" for i in range(length)]
    before = list(items)
    out = shard(items, n)
    sizes = [len(s) for s in out]
    assert len(out) == n
    assert sum(out, []) == items == before                       # order kept, nothing lost or added, input intact
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [length // n + (1 if i < length % n else 0) for i in range(n)]   # the longer shards first
    starts = [sum(sizes[:i]) for i in range(n)]
    assert all(s == items[a: a + len(s)] for s, a in zip(out, starts))              # each shard a contiguous slice
    if n > length:
        assert sizes == [1] * length + [0] * (n - length)


def test_shard_examples():
    assert shard(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard(list(range(4)), 4) == [[0], [1], [2], [3]]
    assert shard(["a"], 3) == [["a"], [], []]
    assert shard([], 2) == [[], []]


# --- rayuid.records.ledger.Ledger --------------------------------------------------------------------------------


def test_ledger_record_counts_and_json_round_trip():
    ledger = Ledger()
    ledger.record(10, ["s9-0", "s9-1"])
    ledger.record(2, ["s1-0"])
    assert ledger.counts() == Counter({"s9-0": 1, "s9-1": 1, "s1-0": 1})
    data = ledger.to_json()
    assert data == {"2": ["s1-0"], "10": ["s9-0", "s9-1"]} and list(data) == ["2", "10"]  # numeric step order
    back = Ledger.from_json(json.loads(json.dumps(data)))
    assert back.steps == {2: ["s1-0"], 10: ["s9-0", "s9-1"]}
    assert back.counts() == ledger.counts() and back.to_json() == data


def test_ledger_refuses_repeats_and_stays_unchanged():
    ledger = Ledger()
    ledger.record(1, ["a", "b"])
    with pytest.raises(DuplicateInteractionError, match=r"^step 2 would train 1 interaction\(s\) again, e.g. \['a'\]$"):
        ledger.record(2, ["c", "a"])
    with pytest.raises(DuplicateInteractionError, match=r"^step 3 would train 1 interaction\(s\) again, e.g. \['d'\]$"):
        ledger.record(3, ["d", "d"])
    assert ledger.steps == {1: ["a", "b"]}


def test_ledger_recording_a_step_again_replaces_it():
    ledger = Ledger({1: ["a"], 2: ["b"]})
    ledger.record(2, ["b", "c"])  # the redone step: its own earlier ids are not repeats
    assert ledger.steps == {1: ["a"], 2: ["b", "c"]}
    assert ledger.counts() == Counter({"a": 1, "b": 1, "c": 1})


def test_ledger_id_at_two_steps_is_counted_twice():
    ledger = Ledger.from_json({"1": ["a", "b"], "2": ["a"]})  # loaded as given (record would have refused it)
    counts = ledger.counts()
    assert counts == Counter({"a": 2, "b": 1})
    assert sum(counts.values()) == 3 and sum(1 for n in counts.values() if n > 1) == 1  # the summary's two counts


def test_ledger_copies_what_it_is_given():
    ids = ["a"]
    ledger = Ledger({"3": ids})
    ids.append("b")
    assert ledger.steps == {3: ["a"]}


# --- rayuid.system.sync ------------------------------------------------------------------------------------------


def test_check_loaded_passes_on_matching_reports():
    # anything after (version, checksum) is timing; lists (as Ray may return them) count like tuples
    assert check_loaded(3, "abc", {"engine0": (3, "abc", 0.25), "teacher0": [3, "abc"]}) is None
    assert check_loaded(3, "abc", {}) is None


def test_check_loaded_names_the_wrong_engine():
    with pytest.raises(SyncError) as err:
        check_loaded(3, "abc", {"engine0": (3, "abc", 0.1), "engine1": (2, "abc", 0.1)})
    assert str(err.value) == "weight sync to v3 (abc) failed: engine1 has v2 (abc)"
    with pytest.raises(SyncError) as err:
        check_loaded(3, "abc", {"teacher0": (0, ""), "engine1": (3, "abc"), "engine0": (3, "zzz", 0.1)})
    assert str(err.value) == "weight sync to v3 (abc) failed: engine0 has v3 (zzz), teacher0 has v0 ()"


def test_timeout_error_names_the_late_engines_sorted():
    err = timeout_error(4, ["teacher0", "engine1"], 29.6)
    assert isinstance(err, SyncError) and isinstance(err, RuntimeError)
    assert str(err).startswith("weight sync to v4 timed out after 30s waiting for engine1, teacher0. ")
    assert "ray.sync_timeout_s" in str(err)


def test_publish_report_to_json():
    engines = {"engine0": 2}
    report = PublishReport(2, "c", 100, export_s=0.125, put_s=0.25, fanout_s=0.75, reload_s=0.25, engines=engines)
    assert report.to_json() == {"version": 2, "checksum": "c", "bytes": 100, "export_s": 0.125, "put_s": 0.25,
                                "fanout_s": 0.75, "transfer_s": 0.5, "reload_s": 0.25, "engines": {"engine0": 2},
                                "via": "object_store"}
    assert report.to_json()["engines"] is not engines
    assert PublishReport(1, "c", 0, fanout_s=0.25, reload_s=0.5).to_json()["transfer_s"] == 0.0  # never negative
    assert PublishReport(1, "c", 0).to_json()["engines"] == {}


# --- rayuid.system.calls.Calls on a real local Ray -------------------------------------------------------------


class FakeEngine:
    """``generate`` logs each attempt; with ``die_first`` its first attempt kills the process (the ``.died`` marker
    survives the restart); with ``wait_for`` it waits until that engine's ``generate`` has started."""

    def __init__(self, name: str, root: str):
        self.name, self.root = name, Path(root)

    def generate(self, prompts: list, die_first: bool = False, wait_for: str | None = None) -> list:
        (self.root / f"{self.name}.started").touch()
        with open(self.root / f"{self.name}.attempts", "a") as fh:
            fh.write(".")
        if die_first and not (self.root / f"{self.name}.died").exists():
            (self.root / f"{self.name}.died").touch()
            os._exit(1)
        saw = None
        if wait_for is not None:
            deadline = time.monotonic() + 20
            while not (self.root / f"{wait_for}.started").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            saw = (self.root / f"{wait_for}.started").exists()
        return [self.name, list(prompts), saw]

    def version(self) -> int:
        return 0


class FakeSync:
    """The WeightSyncActor's ``sync_engine`` without weights: like the real one it waits until Ray has restarted the
    engine (it answers again), then records it and reports version 0."""

    def __init__(self, engines: dict | None = None):
        self.engines, self.synced = engines or {}, []

    def sync_engine(self, name: str) -> int:
        deadline = time.monotonic() + 30
        while name in self.engines:
            try:
                ray.get(self.engines[name].version.remote(), timeout=30)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.synced.append(name)
        return 0

    def names(self) -> list[str]:
        return list(self.synced)


class FakeUser:
    """``respond`` logs each attempt; its first attempt kills the process (once per ``root``)."""

    def __init__(self, root: str):
        self.root = Path(root)

    def respond(self, prompts: list[str], replies: list[str]) -> list[str]:
        with open(self.root / "user.attempts", "a") as fh:
            fh.write(".")
        if not (self.root / "user.died").exists():
            (self.root / "user.died").touch()
            os._exit(1)
        return [f"{p}|{r}" for p, r in zip(prompts, replies)]

    def ready(self) -> bool:
        return True


def _attempts(root: Path, name: str) -> int:
    return len((root / f"{name}.attempts").read_text())


def test_calls_engines_submits_every_shard_then_retries_the_dead_one(local_ray, tmp_path):
    engine = ray.remote(FakeEngine).options(num_cpus=0, max_restarts=1, max_task_retries=0)
    engines = {n: engine.remote(n, str(tmp_path)) for n in ("engine0", "engine1")}
    sync = ray.remote(FakeSync).options(num_cpus=0).remote(engines)
    ray.get([h.version.remote() for h in engines.values()] + [sync.names.remote()], timeout=60)
    calls = Calls(system=SimpleNamespace(engines=engines, sync=sync, users=[]), timeout_s=30, retries=1)
    # engine0 finishes only once engine1's shard has started: were engine1's not submitted before engine0's result
    # is awaited, engine0 would report saw=False (after 20 s)
    out = calls.engines(["engine0", "engine1"], "generate", [([0, 1], False, "engine1"), ([2], True, None)])
    assert out == [["engine0", [0, 1], True], ["engine1", [2], None]]
    assert _attempts(tmp_path, "engine0") == 1
    assert _attempts(tmp_path, "engine1") == 2 and (tmp_path / "engine1.died").exists()  # died once, retried once
    assert ray.get(sync.names.remote()) == ["engine1"]  # brought up to date before the retry, and only it


def test_calls_user_retries_on_a_dead_simulator(local_ray, tmp_path):
    user = ray.remote(FakeUser).options(num_cpus=0, max_restarts=1, max_task_retries=0).remote(str(tmp_path))
    ray.get(user.ready.remote(), timeout=60)
    calls = Calls(system=SimpleNamespace(engines={}, sync=None, users=[user]), timeout_s=30, retries=1)
    out = calls.user("respond", [(["p0"], ["r0"]), (["p1", "p2"], ["r1", "r2"])])
    assert out == [["p0|r0"], ["p1|r1", "p2|r2"]]
    # the first call died (taking the queued second one with it); both were resubmitted to the restarted actor
    assert (tmp_path / "user.died").exists() and _attempts(tmp_path, "user") == 3


def test_calls_user_gives_up_after_its_retries(local_ray, tmp_path):
    user = ray.remote(FakeUser).options(num_cpus=0, max_restarts=0, max_task_retries=0).remote(str(tmp_path))
    ray.get(user.ready.remote(), timeout=60)
    calls = Calls(system=SimpleNamespace(engines={}, sync=None, users=[user]), timeout_s=30, retries=0)
    with pytest.raises(ACTOR_DIED):
        calls.user("respond", [(["p0"], ["r0"])])
    assert _attempts(tmp_path, "user") == 1


# --- rayuid.system.driver.train_with_recovery: what counts as a lost learner ------------------------------------


def _raised_by_a_task(cause: Exception) -> Exception:
    """The exception ``ray.get`` raises for a remote call that failed with ``cause`` (Ray's own wrapping)."""
    return ray.exceptions.RayTaskError("WeightSyncActor.publish", "traceback", cause).as_instanceof_cause()


class RecoveringPolicy:
    """``restore`` / ``restart_learners`` of a Policy, counted; the learners' state is not what is tested here."""

    def __init__(self):
        self.restores, self.restarts = [], 0

    def restore(self, calls, republish: bool):
        self.restores.append(republish)
        return 0, Ledger()

    def restart_learners(self, calls):
        self.restarts += 1
        return calls


@pytest.mark.parametrize("error, recovered", [
    (_raised_by_a_task(ray.exceptions.OwnerDiedError(ray.ObjectRef.nil().hex(), b"", "")), True),  # (seen in CI)
    (_raised_by_a_task(ray.exceptions.ObjectLostError(ray.ObjectRef.nil().hex(), b"", "")), True),  # its node died
    (ray.exceptions.ActorDiedError(), True),
    (_raised_by_a_task(ValueError("a bug")), False)])
def test_a_learner_lost_directly_or_with_the_weights_it_owned_restarts_the_learners(monkeypatch, tmp_path, error,
                                                                                     recovered):
    from rayuid.system import driver

    attempts = []

    def loop(*args):
        attempts.append(1)
        if len(attempts) == 1:
            raise error

    monkeypatch.setattr(driver, "loop", loop)
    cfg = SimpleNamespace(ray=SimpleNamespace(max_restarts=1))
    source = SimpleNamespace(run_dir=tmp_path, truncate_samples=lambda step: None)
    policy = RecoveringPolicy()
    if not recovered:
        with pytest.raises(ValueError):                                       # a bug is not a lost learner
            driver.train_with_recovery(cfg, None, policy, source, None)
        assert policy.restarts == 0 and len(attempts) == 1
        return
    driver.train_with_recovery(cfg, None, policy, source, None)
    assert policy.restarts == 1 and len(attempts) == 2 and policy.restores == [False, True]  # resumed, republished


def test_published_weights_are_packed_in_the_dtype_every_engine_computes_in():
    from rayuid.system.actors.spawn import serve_dtype

    bf16 = {"dtype": "bfloat16", "device": "cpu", "native_bf16": True}
    decided = {"learner0": {"dtype": "float32", "compute_dtype": "bfloat16"}, "engine0": bf16, "teacher0": bf16}
    assert serve_dtype(decided) == "bfloat16"                                    # not the learner's fp32 masters
    assert serve_dtype({**decided, "teacher0": {**bf16, "dtype": "float32"}}) is None   # engines differ: as stored


def test_calls_user_spreads_calls_over_the_replicas_and_retries_each_on_its_own(local_ray, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cls = ray.remote(FakeUser).options(num_cpus=0, max_restarts=1, max_task_retries=0)
    users = [cls.remote(str(tmp_path / "a")), cls.remote(str(tmp_path / "b"))]
    ray.get([u.ready.remote() for u in users], timeout=60)
    calls = Calls(system=SimpleNamespace(engines={}, sync=None, users=users), timeout_s=30, retries=1)
    out = calls.user("respond", [(["p0"], ["r0"]), (["p1"], ["r1"]), (["p2"], ["r2"])])
    assert out == [["p0|r0"], ["p1|r1"], ["p2|r2"]]
    # a: calls 0 and 2 (its first attempt died, taking the queued one along: both sent again), b: call 1 (died once)
    assert _attempts(tmp_path / "a", "user") == 3 and _attempts(tmp_path / "b", "user") == 2


def test_simulate_splits_a_batch_over_the_user_replicas_in_order():
    from rayuid.system import phases

    asked = []

    def user(method, batches):
        asked.append([len(prompts) for prompts, _ in batches])
        return [[f"{p}->{r}" for p, r in zip(prompts, replies)] for prompts, replies in batches]

    samples = [SimpleNamespace(prompt=SimpleNamespace(messages=[{"content": f"q{i}"}]),
                               generation=SimpleNamespace(text=f"a{i}")) for i in range(5)]
    calls = SimpleNamespace(system=SimpleNamespace(users=[0, 1, 2]), user=user)
    assert phases.simulate(calls, samples) == [f"q{i}->a{i}" for i in range(5)]
    assert asked == [[2, 2, 1]]
    calls.system.users = [0] * 8                                       # more replicas than samples: no empty calls
    assert phases.simulate(calls, samples[:2]) == ["q0->a0", "q1->a1"] and asked[-1] == [1, 1]

"""A real multi-node Ray cluster on this machine: a head and two worker nodes started with ``ray start`` (each in
its own process group and temp dir), the smoke job submitted with ``ray job submit``, its roles pinned to node
resources, ``run_dir`` in a bucket of a real S3-compatible server. Then a node loss: the learner's node is killed
mid-run and a new node with the ``learner`` resource joins; the job recovers from the bucket's checkpoint. And the
autoscaler: a job whose roles need node types that are not running makes it start them, and removes them idle."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from ray_nodes import Node, free_port, log_tails, node_ids, ray_env, submit, wait_job

from rayuid.records import storage

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
FP32 = ("model.compute_dtype=float32", "ray.vllm.dtype=float32")
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
FAKE_HEAD = "f" * 51 + "00000"  # that module's FAKE_HEAD_NODE_ID
AUTOSCALER_V2 = {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD,
                 "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD}
PINNED = ("ray.learner.resources={learner: 0.01}", "ray.engine.resources={inference: 0.01}")


@pytest.fixture()
def cluster(s3_server, tmp_path):
    """head (CPU 1, no custom resource: the driver, the weight-sync actor, the rule-based user), an inference
    node ({"inference": 1}) and a learner node ({"learner": 1}). Yields a dict of them; stops every node it
    started (also ones a test adds under a new key)."""
    nodes = {"head": Node(head=True, num_cpus=1)}
    try:
        address = nodes["head"].address
        nodes["inference"] = Node(address=address, resources={"inference": 1})
        nodes["learner"] = Node(address=address, resources={"learner": 1})
        yield nodes
    finally:
        for node in reversed(list(nodes.values())):
            node.stop()


def _role_of(resources: dict) -> str:
    return next((r for r in ("inference", "learner") if r in resources), "head")


def _smoke(uri: str, tiny_model_dir: str, *overrides: str) -> tuple[str, ...]:
    return ("rayuid", "train", "jobs/smoke.yaml", f"run_dir={uri}", f"model.name={tiny_model_dir}", *FP32, *PINNED,
            *overrides)


def test_the_engine_and_the_learner_run_on_their_own_nodes(cluster, s3_bucket, tiny_model_dir):
    head = cluster["head"]
    roles = {_role_of(res): nid for nid, res in node_ids(head).items()}
    assert len(roles) == 3
    uri = s3_bucket + "/multinode"
    state, logs = wait_job(head, submit(head, *_smoke(uri, tiny_model_dir)))
    assert state == "SUCCEEDED", logs
    summary = json.loads(storage.read_text(uri + "/summary.json"))
    nodes = summary["nodes"]
    assert nodes["learner0"] == roles["learner"] and nodes["engine0"] == roles["inference"]
    assert nodes["driver"] == roles["head"] and len({nodes["driver"], nodes["learner0"], nodes["engine0"]}) == 3
    assert summary["steps_done"] == 3 and summary["interactions_trained_twice"] == 0
    assert summary["run_dir"] == uri and storage.exists(uri + "/checkpoints/step-000003/hf/model.safetensors")


def test_a_lost_learner_node_is_replaced_and_the_run_resumes_from_the_bucket(cluster, s3_bucket, tiny_model_dir,
                                                                              tmp_path):
    head = cluster["head"]
    uri = s3_bucket + "/node-loss"
    job = submit(head, *_smoke(uri, tiny_model_dir, "online.steps=30", "checkpoint.every_steps=2",
                               "ray.call_timeout_s=600"))
    metrics = uri + "/metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not storage.exists(metrics) or len(storage.read_text(metrics).splitlines()) < 3):
        time.sleep(0.5)
    lost = next(nid for nid, res in node_ids(head).items() if "learner" in res)
    cluster["learner"].kill()                          # node loss, mid-run (the tiny model's steps take < 1 s)
    time.sleep(5)
    cluster["learner-2"] = Node(address=head.address, resources={"learner": 1})
    state, logs = wait_job(head, job)
    assert state == "SUCCEEDED", logs
    summary = json.loads(storage.read_text(uri + "/summary.json"))
    assert summary["nodes"]["learner0"] != lost and summary["nodes"]["learner0"] in node_ids(head), logs
    assert summary["steps_done"] == 30 and summary["interactions_trained_twice"] == 0
    records = [json.loads(ln) for ln in storage.read_text(metrics).splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))          # steps after the checkpoint redone once
    ledger = json.loads(storage.read_text(uri + "/ledger.json"))
    ids = [i for step in ledger.values() for i in step]
    assert len(ids) == len(set(ids)) == 120


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_a_local_run_dir_that_another_node_does_not_see_is_refused_before_training(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    nodes = [Node(head=True, num_cpus=1)]
    head = nodes[0]
    try:
        nodes.append(Node(address=head.address, resources={"learner": 1}, private_dir=run_dir))
        worker = next(nid for nid, res in node_ids(head).items() if "learner" in res)
        state, logs = wait_job(head, submit(head, *_smoke(str(run_dir / "local"), tiny_model_dir)))
        assert state == "FAILED"
        error = next(ln for ln in logs.splitlines() if ln.startswith("error: "))
        assert f"node(s) ['{worker[:12]}'] do not share" in error and "s3://" in error, logs
        assert not (run_dir / "local" / "checkpoints").exists() and not (run_dir / "local" / "metrics.jsonl").exists()
    finally:
        for node in reversed(nodes):
            node.stop()


def _fake_autoscaling_config(gcs: str) -> dict:
    """Ray's fake multi-node provider (what Ray's own autoscaler tests use): it "launches" a node by starting a
    raylet on this machine. Node types mirror cluster/'s, with CPU stand-ins for the GPU types.

    Loaded as an ``external`` provider under autoscaler v2 because in the Ray 2.60 wheel ``type: fake_multinode``
    looks for a defaults file the wheel does not ship, and autoscaler v1 tracks fake nodes by IP (one IP here)."""
    worker = {"node_config": {}, "min_workers": 0, "max_workers": 1}
    return {"cluster_name": "rayuid-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1.5,
            "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs,
                         "launch_multiple": True, "head_node_id": FAKE_HEAD,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "docker": {}, "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                "cpu_inference": {**worker, "resources": {"CPU": 1, "inference": 1}},
                "cpu_learner": {**worker, "resources": {"CPU": 1, "learner": 1}}},
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}


def test_the_autoscaler_starts_the_nodes_a_job_needs_and_removes_them_when_idle(s3_bucket, tiny_model_dir,
                                                                               tmp_path):
    port = free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(_fake_autoscaling_config(f"127.0.0.1:{port}")))
    env = ray_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled", **AUTOSCALER_V2)
    head = Node(head=True, num_cpus=1, env=env, port=port, extra=(f"--autoscaling-config={config}",))
    try:
        assert [_role_of(r) for r in node_ids(head).values()] == ["head"]      # no worker node yet
        uri = s3_bucket + "/autoscaled"
        # the learner and engine bundles are pending until the autoscaler has started a node of each type
        state, logs = wait_job(head, submit(head, *_smoke(uri, tiny_model_dir, "ray.call_timeout_s=300")))
        assert state == "SUCCEEDED", logs + "\n" + log_tails(head)
        summary = json.loads(storage.read_text(uri + "/summary.json"))
        nodes = node_ids(head)
        assert {_role_of(nodes[summary["nodes"][r]]) for r in ("learner0", "engine0")} == {"learner", "inference"}
        assert summary["steps_done"] == 3 and summary["interactions_trained_twice"] == 0
        deadline = time.time() + 240                        # idle_timeout_minutes: 1.5, then scale down
        while time.time() < deadline and len(node_ids(head)) > 1:
            time.sleep(2)
        assert [_role_of(r) for r in node_ids(head).values()] == ["head"]
    finally:
        head.stop()

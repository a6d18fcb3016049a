"""`ray job submit` of the smoke config against a Ray head this test starts (token auth on, as Ray 2.60 defaults)
and stops by its own process group (``tests/ray_nodes.py``)."""

from __future__ import annotations

import json

import pytest
from ray_nodes import Node, submit, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture()
def ray_head(tmp_path):
    head = Node(head=True, num_cpus=2)
    try:
        yield head
    finally:
        head.stop()


def test_smoke_job_reaches_succeeded(ray_head, tmp_path):
    run_dir = tmp_path / "job_run"
    job_id = submit(ray_head, "rayuid", "train", "jobs/smoke.yaml", f"run_dir={run_dir}")
    state, logs = wait_job(ray_head, job_id)
    assert state == "SUCCEEDED", logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["interactions_trained_twice"] == 0
    assert set(summary["nodes"].values()) == {summary["nodes"]["driver"]}   # one node: everything on it

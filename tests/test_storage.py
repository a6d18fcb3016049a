"""Run storage (``rayuid.records.storage``) against a real S3-compatible server on loopback, and local paths.

What must hold for every kind of location: a folder counts only once its marker is there, listing and pruning work
in the bucket, a driver's working copy round-trips, and a single-process run with ``run_dir=s3://…`` resumes from
the bucket with the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayuid.records import checkpoint as ckpt
from rayuid.records import storage


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/prefix/run"


def test_files_round_trip_and_folders_list_delete(location):
    assert storage.listdir(location) == [] and not storage.exists(location)
    storage.write_text(storage.join(location, "a", "x.json"), '{"k": 1}')
    storage.write_text(storage.join(location, "b.txt"), "hello")
    assert storage.listdir(location) == ["a", "b.txt"]
    assert json.loads(storage.read_text(storage.join(location, "a", "x.json"))) == {"k": 1}
    storage.write_text(storage.join(location, "b.txt"), "replaced")             # a whole file, replaced
    assert storage.read_text(storage.join(location, "b.txt")) == "replaced"
    storage.delete(storage.join(location, "a"))
    assert storage.listdir(location) == ["b.txt"] and not storage.exists(storage.join(location, "a", "x.json"))
    storage.delete(storage.join(location, "missing"))                             # deleting nothing is fine


def test_a_checkpoint_counts_once_its_marker_is_there_and_prune_keeps_the_newest(location, tmp_path):
    src = tmp_path / "src"
    (src / "dcp").mkdir(parents=True)
    (src / "dcp" / "shard.bin").write_bytes(b"\0" * 1000)
    (src / "marker.json").write_text("{}")
    for step in (2, 4, 6):
        storage.put_folder(src, ckpt.step_dir(location, step), last="marker.json")
    storage.put_folder(src, ckpt.step_dir(location, 8), skip=("marker.json",))  # a crash before the marker
    found = ckpt.list_checkpoints(location, marker="marker.json")
    assert [p.rsplit("-", 1)[-1] for p in found] == ["000002", "000004", "000006"]
    assert ckpt.latest_checkpoint(location, marker="marker.json") == ckpt.step_dir(location, 6)
    ckpt.prune_checkpoints(location, keep_last=2, marker="marker.json")
    assert storage.listdir(ckpt.checkpoints_dir(location)) == ["step-000004", "step-000006", "step-000008"]
    back = storage.get_folder(ckpt.step_dir(location, 6), tmp_path / "back")
    assert (back / "dcp" / "shard.bin").read_bytes() == b"\0" * 1000 and (back / "marker.json").exists()


def test_run_dir_push_uploads_only_what_changed_and_pull_restores_it(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    uri = s3_bucket + "/runs/one"
    first = storage.RunDir(uri)
    first.pull()
    assert first.remote and first.local.is_relative_to(tmp_path / "staging") and list(first.local.iterdir()) == []
    (first.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (first.local / "tensorboard").mkdir()
    (first.local / "tensorboard" / "events").write_bytes(b"ev")
    (first.local / "checkpoints").mkdir()                      # the learners upload their own; never the driver
    (first.local / "checkpoints" / "x").write_text("not mine")
    uploads = []
    monkeypatch.setattr(storage, "put_file", lambda src, dst, real=storage.put_file: (uploads.append(dst),
                                                                                        real(src, dst)))
    first.push()
    assert sorted(uploads) == [uri + "/metrics.jsonl", uri + "/tensorboard/events"]
    uploads.clear()
    with (first.local / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 2}\n')
    first.push()
    assert uploads == [uri + "/metrics.jsonl"]                 # only the file that changed
    assert storage.listdir(uri) == ["metrics.jsonl", "tensorboard"]
    # a driver started again (any node) gets the records back, and nothing else
    (first.local / "stale.txt").write_text("left over from a killed driver")
    again = storage.RunDir(uri)
    again.pull()
    assert sorted(p.name for p in again.local.iterdir()) == ["metrics.jsonl", "tensorboard"]
    assert (again.local / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    summary = again.located({"plot": str(again.local / "metrics.png"), "n": 3, "other": "/elsewhere/x"})
    assert summary == {"plot": uri + "/metrics.png", "n": 3, "other": "/elsewhere/x"}


def test_a_local_run_dir_is_its_own_working_copy(tmp_path):
    run = storage.RunDir(tmp_path / "run")
    run.pull()
    assert not run.remote and run.local == tmp_path / "run" and run.local.is_dir()
    (run.local / "metrics.jsonl").write_text("x")
    run.push()                                                 # nothing to upload
    assert run.located({"p": str(run.local / "metrics.jsonl")}) == {"p": str(run.local / "metrics.jsonl")}


def test_an_unreachable_store_fails_with_what_to_set(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(OSError):
        storage.listdir("s3://no-such-bucket/run")
    with pytest.raises(storage.StorageError, match="AWS_ENDPOINT_URL"):
        storage.RunDir("nosuchscheme://bucket/run")


def test_offline_trainer_resumes_from_the_bucket_with_the_losses_of_an_uninterrupted_run(s3_bucket, tmp_path,
                                                                                        tiny_model_dir, monkeypatch):
    from rayuid.config import TrainConfig
    from rayuid.offline.export import export
    from rayuid.offline.trainer import train

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    data = tmp_path / "data.jsonl"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Say {i} in words."},
                                          {"role": "assistant", "content": f"The number is {i}, friend."},
                                          {"role": "user", "content": "Shorter, please."}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(run_dir):
        return TrainConfig.model_validate(dict(
            run_dir=run_dir, seed=1, model=dict(name=tiny_model_dir, dtype="float32", compute_dtype="float32"),
            data=dict(paths=[str(data)]), optim=dict(lr=1e-3, micro_batch_size=2, grad_accum_steps=1, max_steps=6),
            checkpoint=dict(every_steps=2, keep_last=2)))

    straight = train(cfg(str(tmp_path / "straight")))
    uri = s3_bucket + "/offline"
    train(cfg(uri), stop_after=3)                              # interrupted after step 3 (checkpoint at 2)
    resumed = train(cfg(uri))
    losses = lambda text: [json.loads(ln)["loss"] for ln in text.splitlines()]  # noqa: E731
    assert losses(storage.read_text(uri + "/metrics.jsonl")) == pytest.approx(
        losses((tmp_path / "straight" / "metrics.jsonl").read_text()), abs=1e-6)
    assert resumed["run_dir"] == uri and resumed["checkpoint"] == uri + "/checkpoints/step-000006"
    assert resumed["metrics"] == uri + "/metrics.jsonl" and storage.exists(resumed["plot"])
    assert storage.listdir(uri + "/checkpoints") == ["step-000004", "step-000006"]   # keep_last pruned the bucket
    assert straight["steps_done"] == resumed["steps_done"] == 6
    served = export(uri, tmp_path / "served")                  # rayuid export from an S3 run dir
    assert (Path(served) / "model.safetensors").exists() and (Path(served) / "tokenizer_config.json").exists()

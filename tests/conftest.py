"""Shared fixtures: a tiny chat model built offline, isolated HF caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_home(tmp_path_factory):
    """Datasets/hub caches go to a temp dir; nothing is fetched from a hub in tests."""
    home = tmp_path_factory.mktemp("hf_home")
    old = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from rayuid.sdpo.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    from rayuid.sdpo.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from rayuid.sdpo.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def local_ray():
    """A local 2-CPU Ray for the actor tests of one module (vLLM in-process inside the actors)."""
    import ray

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture()
def shared_data() -> Path:
    path = SHARED / "data" / "external"
    if not path.is_dir():
        pytest.skip("../shared is not available on this machine")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, from PyPI) on loopback, in its own process group, stopped by that id.
    Sets the standard AWS variables for this process and everything it starts (Ray included); returns the
    endpoint URL."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket for one test: its ``s3://`` URI."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"

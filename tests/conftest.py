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

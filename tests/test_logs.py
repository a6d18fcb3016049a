"""The environment every actor starts with: the run's verbosity and the allocator setting (rayuid.logs, spawn)."""

from __future__ import annotations

import logging
import warnings

from rayuid import logs


def test_quiet_by_default_verbose_on_request(monkeypatch):
    monkeypatch.delenv(logs.ENV, raising=False)
    assert logs.level() == logging.WARNING and not logs.verbose()
    quiet = logs.actor_env()
    assert quiet[logs.ENV] == "WARNING" and quiet["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert quiet["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and quiet["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    assert logs.ray_level() == logging.ERROR
    monkeypatch.setenv(logs.ENV, "info")
    loud = logs.actor_env()
    assert logs.verbose() and loud == {logs.ENV: "INFO", "VLLM_LOGGING_LEVEL": "INFO"}
    assert logs.ray_level() == logging.INFO
    monkeypatch.setenv(logs.ENV, "no-such-level")
    assert logs.level() == logging.WARNING


def test_quiet_warnings_are_one_line(monkeypatch):
    """configure() changes this process: everything it touches is put back after the test."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    for key in [logs.ENV, *logs.quiet_env(False)]:
        monkeypatch.delenv(key, raising=False)
    names = ("rayuid", "ray", "vllm", "transformers", "torch")
    for name in names:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    logs.configure(False)
    assert logging.getLogger("vllm").level == logging.ERROR and logging.getLogger("rayuid").level == logging.WARNING
    text = warnings.formatwarning(UserWarning("set x=auto"), UserWarning, "/some/file.py", 12, "source line")
    assert text == "warning: set x=auto\n"


def test_actors_get_the_allocator_setting_unless_overridden(monkeypatch):
    from rayuid.system.actors.spawn import ACTOR_ENV, ALLOCATOR_ENV, actor_env

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    env = actor_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(4 << 30) and env["MALLOC_TRIM_THRESHOLD_"] == str(64 << 30)
    assert all(env[k] == v for k, v in ACTOR_ENV.items()) and set(ALLOCATOR_ENV) <= set(env)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert actor_env()["MALLOC_MMAP_THRESHOLD_"] == "131072"

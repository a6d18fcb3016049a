"""Quiet by default, everything with ``-v``: one verbosity for the driver and every actor it starts.

The CLI sets it (``RAYUID_LOG_LEVEL``); ``actor_env`` carries it into the actors' runtime env, where it also sets
vLLM's own level and turns off the per-actor progress bars (HF's "Loading weights", shard writers). Quiet, a run
shows the driver's progress bar, its results, warnings from rayuid, and errors; vLLM's INFO pages, its per-publish
"RotaryEmbedding: Failed to load weights" (harmless: the rotary tables are computed, not loaded, and are put back
unchanged) and other harmless warnings appear only with ``-v``. (Its "ParallelLMHead: Failed to load weights" was
not harmless: the old LM head was put back; rayuid now publishes a tied head under its own name.)
"""

from __future__ import annotations

import logging
import os
import warnings

ENV = "RAYUID_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level() -> int:
    """The run's level: ``RAYUID_LOG_LEVEL`` (a logging level name), WARNING when unset."""
    value = logging.getLevelName(os.environ.get(ENV, "WARNING").upper())
    return value if isinstance(value, int) else logging.WARNING


def verbose() -> bool:
    return level() <= logging.INFO


def quiet_env(is_verbose: bool) -> dict[str, str]:
    """Environment for a process's libraries: progress bars and vLLM's level follow the run's verbosity."""
    if is_verbose:
        return {"VLLM_LOGGING_LEVEL": "INFO"}
    return {"VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def ray_level() -> int:
    """Ray's own logger: its start-up notes only with ``-v``."""
    return level() if verbose() else logging.ERROR


def actor_env() -> dict[str, str]:
    """What every actor's runtime env gets, so it is as quiet (or verbose) as the driver."""
    return {ENV: logging.getLevelName(level()), **quiet_env(verbose())}


def configure(is_verbose: bool | None = None) -> None:
    """Set up logging in this process (the CLI, or an actor at start) for the run's verbosity."""
    if is_verbose is not None:
        os.environ[ENV] = "INFO" if is_verbose else "WARNING"
    for key, value in quiet_env(verbose()).items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=level(), format=FORMAT)
    logging.getLogger("rayuid").setLevel(level())
    if not verbose():
        for name in ("ray", "vllm", "transformers", "torch"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes to each other
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.formatwarning = _one_line  # what is left is meant for the user: no file:line or source echo


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"

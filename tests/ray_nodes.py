"""Ray nodes that a test starts with ``ray start`` and stops by its own id, never with ``ray stop`` (which stops
every Ray on the machine, other people's experiments included).

Each node runs in its own process group (its raylet, GCS, dashboard and workers inherit it) and its own
``--temp-dir`` (nodes sharing one temp dir garbage-collect each other's ``working_dir`` packages mid-job).
Ray resolves ``127.0.0.1`` to the machine's own interface address for its internal ports; the dashboard / job API
a test talks to is bound to loopback.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60's token auth (its default) needs a token before `ray start --head`; one per test session, passed in the
# environment, so no test depends on ~/.ray/auth_token existing or writes it.
AUTH_TOKEN = secrets.token_hex(32)


def ray_env(**extra: str) -> dict:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": AUTH_TOKEN, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


class Node:
    """One ``ray start``: ``head=True`` for the head (then ``address`` / ``dashboard`` say where it is).
    ``private_dir``: start the node in its own mount namespace with an empty tmpfs over that folder (needs root),
    so it stands for a machine whose local disk the other nodes do not see."""

    def __init__(self, *, head: bool = False, address: str | None = None, num_cpus: int = 1,
                 resources: dict | None = None, env: dict | None = None, port: int | None = None,
                 extra: tuple[str, ...] = (), private_dir: Path | None = None):
        # short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes
        self.temp_dir, self.env = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp")), env or ray_env()
        args = [shutil.which("ray", path=self.env["PATH"]), "start", f"--num-cpus={num_cpus}",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *extra]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if head:
            port, dash = port or free_port(), free_port()
            args += ["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                     "--include-dashboard=true"]
            self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        else:
            args.append(f"--address={address}")
        if private_dir is not None:  # this node sees its own empty ``private_dir``: a disk the others do not share
            script = f'mount -t tmpfs tmpfs "{private_dir}" && exec "$@"'
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args]
        proc = subprocess.Popen(args, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.pgid = proc.pid
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {out[-2000:]}")

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the node's process group, SIGKILL what is left after ``grace_s``; remove its temp dir."""
        self._signal(signal.SIGTERM, grace_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL every process of the node at once (also: a node loss)."""
        self._signal(signal.SIGKILL, 10.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _signal(self, sig: int, wait_s: float) -> None:
        if not self.alive():
            return
        os.killpg(self.pgid, sig)
        deadline = time.time() + wait_s
        while self.alive() and time.time() < deadline:
            time.sleep(0.2)


def node_ids(head: Node) -> dict[str, dict]:
    """Alive node id → its total resources, from the head's state API."""
    out = subprocess.run(["ray", "list", "nodes", "--address", head.dashboard, "--format", "json", "--detail",
                          "--filter", "state=ALIVE"], env=head.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return {n["node_id"]: n["resources_total"] for n in json.loads(out.stdout)}


def submit(head: Node, *entrypoint: str) -> str:
    """``ray job submit --no-wait`` of the repo (with jobs/runtime_env.yaml); returns the submission id."""
    cmd = ["ray", "job", "submit", "--address", head.dashboard, "--runtime-env", "jobs/runtime_env.yaml",
           "--working-dir", str(ROOT), "--no-wait", "--", *entrypoint]
    for _ in range(12):  # a loaded machine may bring the head's job agent up after `ray start` returns
        out = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if "No available agent" not in out.stdout + out.stderr:
            break
        time.sleep(10)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"(raysubmit_\w+)", out.stdout + out.stderr).group(1)


def status(head: Node, job_id: str) -> str:
    proc = subprocess.run(["ray", "job", "status", "--address", head.dashboard, job_id], env=head.env,
                          capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr  # the ray CLI logs to stderr


def wait_job(head: Node, job_id: str, timeout_s: float = 900) -> tuple[str, str]:
    """Poll until the job ends; returns (SUCCEEDED/FAILED/STOPPED or TIMEOUT, the tail of its logs)."""
    deadline, state = time.time() + timeout_s, "TIMEOUT"
    while time.time() < deadline:
        found = re.search(r"\b(SUCCEEDED|FAILED|STOPPED)\b", status(head, job_id), re.IGNORECASE)
        if found:
            state = found.group(1).upper()
            break
        time.sleep(5)
    logs = subprocess.run(["ray", "job", "logs", "--address", head.dashboard, job_id], env=head.env,
                          capture_output=True, text=True, timeout=120).stdout
    return state, logs[-4000:]


def log_tails(node: Node, names: tuple[str, ...] = ("monitor.log", "gcs_server.out", "raylet.out"),
              chars: int = 3000) -> str:
    """The ends of a node's own Ray logs (its autoscaler, GCS, raylet), for a failing test's message."""
    logs = node.temp_dir / "session_latest" / "logs"
    parts = [f"--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}"
             for name in names for p in sorted(logs.glob(name))]
    return "\n".join(parts) or f"(no logs under {logs})"

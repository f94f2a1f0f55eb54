"""Shared pieces of the benchmark scripts: processes on loopback and plots."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PLOTS = REPO / "docs" / "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on loopback, killed with its whole process group."""

    def __init__(self, cmd: Sequence[str], ready_url: str, env: dict[str, str], log: Path,
                 cpus: set[int] | None = None) -> None:  # fmt: skip
        self.ready_url = ready_url
        self.log = log
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(cmd), env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                process_group=0, cwd=REPO, preexec_fn=pin,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(self.ready_url)

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` of the ready URL."""
        return "/".join(self.ready_url.split("/")[:3])

    def cpu_s(self) -> float:
        """CPU seconds used so far by the server and all its children."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_mib(self) -> float:
        """Resident memory of the server and its children."""
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


def python() -> str:
    return sys.executable


def bar_plot(path: Path, title: str, labels: list[str], values: list[float], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(values)), 3.5))
    palette = ["#3b7dd8", "#e07b39", "#5aa469", "#9467bd", "#c44e52", "#8c8c8c"]
    bars = ax.bar(labels, values, color=[palette[i % len(palette)] for i in range(len(values))])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Shared pieces of the benchmark scripts: processes on loopback and plots."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from infra.procs import start_child, wait_ready

REPO = Path(__file__).resolve().parent.parent
PLOTS = REPO / "docs" / "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on loopback (``infra.procs.start_child``), killed
    with its whole process group; optionally pinned to ``cpus``."""

    def __init__(self, cmd: Sequence[str], ready_url: str, env: dict[str, str], log: Path,
                 cpus: set[int] | None = None) -> None:  # fmt: skip
        self.child = start_child(log.stem, cmd, ready_url=ready_url, log=log, env=env, cwd=REPO,
                                 cpus=cpus)  # fmt: skip
        self.proc = self.child.proc
        self.ready_url = ready_url
        self.log = log

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        wait_ready([self.child], timeout_s, poll_s=0.3)

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` of the ready URL."""
        return self.child.base_url

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
        self.child.stop()


def python() -> str:
    return sys.executable


def tool_venv(venv: Path, packages: Sequence[str], binaries: Sequence[str]) -> Path:
    """The ``bin`` directory of a benchmark tool's own virtualenv (not a Shoal
    dependency), created and filled with ``packages`` unless every one of
    ``binaries`` is already there."""
    bin_dir = venv / "bin"
    if not all((bin_dir / name).exists() for name in binaries):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *packages], check=True)
    return bin_dir


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

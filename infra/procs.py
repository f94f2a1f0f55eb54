"""Child processes that die with their parent, even a SIGKILLed one.

Every long-lived process Shoal starts goes through ``spawn``: the embedded
Valkey server, the instance workers, gateway and autoscaler of ``shoal up``,
and the workers of the autoscaler's local provider. Each child

- gets ``death_signal`` from the kernel when its parent dies, however it dies
  (Linux ``prctl(PR_SET_PDEATHSIG)``). SIGTERM by default, not SIGKILL: a
  worker then runs its own shutdown, which stops what *it* started (vLLM's
  engine-core processes have no death signal and would outlive a SIGKILLed
  worker). A worker still starting finishes its start-up first (uvicorn acts
  on SIGTERM only once the app's lifespan start-up is over).
- sets it itself, before ``exec``: run as a script by a bare interpreter
  (``python -I -S``, some 20 ms), this file calls ``prctl`` and then execs the
  command (the setting survives ``exec``). A ``preexec_fn`` would do the
  same in the forked child, but that is unsafe in a parent with threads.
- exits at once if its parent died before the ``prctl`` (``getppid()`` is no
  longer the parent): the one window the kernel does not cover.
- runs in its own process group (stopped as one by ``kill_group``; a
  terminal's Ctrl-C reaches only the parent, which stops children in order)
  but in the parent's session: with the kernel's autogroup scheduling a
  session is a fairness unit, and a vLLM engine busy-polling in a session of
  its own starves the other processes on its cores for seconds (it starved
  Valkey until every gateway's reservations timed out). Hence never
  ``start_new_session``.

The kernel sends the death signal when the *thread* that forked the child
exits, not the process, so ``spawn`` refuses to run off the main thread (a
child forked by an ``asyncio.to_thread`` worker dies when that pool shuts
down). Elsewhere than Linux children get no death signal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

SHOAL_MODULE = "shoal"
"""``python -m shoal``: how every Shoal process is started (the composition root)."""

_PR_SET_PDEATHSIG = 1
_WRAPPER = str(Path(__file__).resolve())


def shoal_command(*args: str, python: str = sys.executable) -> list[str]:
    """The command line of ``shoal <args>`` run by ``python``."""
    return [python, "-m", SHOAL_MODULE, *args]


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    cwd: Path | None = None,
    death_signal: signal.Signals = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` as a child that gets ``death_signal`` when this process
    dies, in its own process group and this session (see the module)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "spawn() must run on the main thread: the parent-death signal fires "
            "when the thread that forked the child exits"
        )
    argv = list(cmd)
    # The wrapper would only fail after the fork; a missing program is the
    # caller's error, raised here as Popen would.
    path = (env if env is not None else os.environ).get("PATH")
    if shutil.which(argv[0], path=path) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", _WRAPPER, str(os.getpid()),
                str(int(death_signal)), "--", *argv]  # fmt: skip
    return subprocess.Popen(
        argv, env=None if env is None else dict(env), stdout=stdout, stderr=stderr, cwd=cwd,
        process_group=0,
    )  # fmt: skip


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group: the child and whatever it left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _sleep(timeout_s: float) -> bool:
    time.sleep(timeout_s)
    return False


def stop_all(
    procs: Sequence[subprocess.Popen[bytes]],
    grace_s: float,
    *,
    sleep: Callable[[float], bool] = _sleep,
) -> None:
    """SIGTERM every child, then SIGKILL each process group once all exited
    or after ``grace_s``, sooner if ``sleep`` (waits up to its argument)
    returns True: the caller was told to hurry (a second Ctrl-C)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs):
        left = deadline - time.monotonic()
        if left <= 0 or sleep(min(0.1, left)):
            break
    for proc in procs:
        kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


# -- servers: started, waited for, stopped -------------------------------------
_DIRECT = urllib.request.build_opener(
    urllib.request.ProxyHandler({}),
    urllib.request.HTTPSHandler(context=ssl._create_unverified_context()),
)
"""Readiness probes go straight to loopback, whatever proxy the environment
names; over TLS, they ask whether the child answers, not who it is (as
Kubernetes' HTTPS probes do), so a child's own certificate needs no trust."""


@dataclass
class Child:
    """A server started by ``start_child``: ready once ``ready_url`` answers 200."""

    name: str
    proc: subprocess.Popen[bytes]
    ready_url: str
    log: Path

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` of the ready URL."""
        return "/".join(self.ready_url.split("/")[:3])

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def answers(self, timeout_s: float = 1.0) -> bool:
        try:
            with _DIRECT.open(self.ready_url, timeout=timeout_s) as resp:
                return bool(resp.status == 200)
        except (OSError, ValueError):
            return False

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL of its process group after ``grace_s``."""
        stop_all([self.proc], grace_s)


class ChildExited(RuntimeError):
    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} exited with {child.proc.returncode} before it was "
                         f"ready; the end of {child.log}:\n{child.log_tail(15)}")  # fmt: skip
        self.child = child


def start_child(
    name: str, cmd: Sequence[str], *, ready_url: str, log: Path,
    env: Mapping[str, str] | None = None, cwd: Path | None = None,
    cpus: set[int] | None = None,
) -> Child:  # fmt: skip
    """``spawn`` a server with its output in ``log``, pinned to ``cpus`` if given
    (set before its start-up spawns threads, which inherit it)."""
    with log.open("wb") as out:
        proc = spawn(cmd, env={**os.environ, **(env or {})}, stdout=out,
                     stderr=subprocess.STDOUT, cwd=cwd)  # fmt: skip
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return Child(name, proc, ready_url, log)


def wait_ready(
    children: Sequence[Child], timeout_s: float, *,
    sleep: Callable[[float], object] = time.sleep, check: Callable[[], None] = lambda: None,
    on_ready: Callable[[Child], None] = lambda _: None, poll_s: float = 0.1,
) -> None:  # fmt: skip
    """Wait until every child answers: :class:`ChildExited` if one dies first,
    ``TimeoutError`` after ``timeout_s``; ``check`` may raise to give up sooner
    (a Ctrl-C)."""
    pending = list(children)
    deadline = time.monotonic() + timeout_s
    while pending:
        for child in list(pending):
            check()
            if child.proc.poll() is not None:
                raise ChildExited(child)
            if child.answers():
                pending.remove(child)
                on_ready(child)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f}s: {[c.name for c in pending]}")
        if pending:
            sleep(poll_s)


# -- the wrapper: ``python -I -S procs.py PARENT_PID SIGNAL -- CMD...`` ------
def _set_death_signal(signum: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _exec_child(argv: list[str]) -> NoReturn:
    parent, signum, _, *cmd = argv
    _set_death_signal(int(signum))
    if os.getppid() != int(parent):
        os._exit(128 + int(signum))  # the parent died before the prctl: no signal will come
    # The interpreter ignores these two; ignored signals survive exec.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"cannot run {cmd[0]}: {exc}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    _exec_child(sys.argv[1:])

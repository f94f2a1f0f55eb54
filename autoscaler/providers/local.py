"""``local``: instance workers as processes on this machine.

Each worker gets a free port and, for vLLM, the next core to pin its engine
to. Workers are started by ``infra.procs.spawn``: in their own process group
(stopped as one) but in the autoscaler's session (the scheduler autogroup,
see there), and with a parent-death signal, so they stop with the autoscaler
however it ends: SIGKILLed too, they get SIGTERM, finish, deregister and stop
their engines. ``spawn`` runs on the event loop's thread, the main one: the
kernel sends that signal when the forking thread exits, which rules out
``asyncio.to_thread``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from autoscaler.providers.base import WorkerLaunch
from infra.procs import kill_group, spawn
from infra.records import InstanceInfo

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalProvider:
    name = "local"

    def __init__(self, launch: WorkerLaunch, log_dir: Path, *, host: str = "127.0.0.1",
                 stop_timeout_s: float = 60.0) -> None:  # fmt: skip
        self._launch = launch
        self._log_dir = log_dir
        self._host = host
        self._stop_timeout_s = stop_timeout_s
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._num_started = 0

    def _core_args(self) -> list[str]:
        if self._launch.engine != "vllm":
            return []
        core = self._num_started % (os.cpu_count() or 1)
        return ["--cpu-threads-bind", str(core)]

    async def start(self, instance_id: str) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self._launch.command(instance_id, _free_port(self._host)), *self._core_args()]
        # Blocks the loop for the fork and exec of a bare interpreter only
        # (milliseconds): the worker's own start-up runs after the exec.
        with (self._log_dir / f"{instance_id}.log").open("ab") as out:
            proc = spawn(cmd, env={**os.environ, **self._launch.env}, stdout=out,
                         stderr=subprocess.STDOUT)  # fmt: skip
        self._num_started += 1
        self._procs[instance_id] = proc
        log.info("started %s (pid %d)", instance_id, proc.pid)

    async def stop(self, instance_id: str, info: InstanceInfo | None) -> None:
        proc = self._procs.pop(instance_id, None)
        if proc is not None:
            await self._stop_proc(proc)
        elif info is not None and info.hostname == socket.gethostname():
            with contextlib.suppress(ProcessLookupError):  # launched by another autoscaler
                os.kill(info.pid, signal.SIGTERM)
        else:
            log.warning("cannot stop %s: not launched here", instance_id)

    async def _stop_proc(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, self._stop_timeout_s)
        kill_group(proc)
        await asyncio.to_thread(proc.wait)

    def launched(self) -> list[str]:
        for instance_id, proc in list(self._procs.items()):
            if proc.poll() is not None:
                log.warning("%s exited with %s", instance_id, proc.returncode)
                del self._procs[instance_id]
        return sorted(self._procs)

    async def close(self) -> None:
        """Stop every worker launched here: local workers belong to this
        process (a SIGKILLed autoscaler takes them with it through their
        parent-death signal; a standby then starts its own)."""
        await asyncio.gather(*(self._stop_proc(p) for p in self._procs.values()))
        self._procs.clear()

"""A real autoscaler stack for tests: autoscalers and a gateway as processes
on loopback against the session's Redis, streams read as a client would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil
from redis.asyncio import Redis

from infra.events import Event, EventLog
from infra.keys import KeySchema
from infra.records import InstanceView
from infra.store import StateStore
from tests.helpers import WorkerProcess, start_autoscaler, start_gateway


class Stack:
    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url, self.log_dir = redis_url, log_dir
        self.ns = f"as-{uuid.uuid4().hex[:6]}"
        self.procs: list[WorkerProcess] = []

    def autoscaler(self, name: str, *args: str, engine: str = "sim",
                   env: dict[str, str] | None = None) -> WorkerProcess:  # fmt: skip
        p = start_autoscaler(
            redis_url=self.redis_url, namespace=self.ns, log_dir=self.log_dir, name=name,
            args=["--engine", engine, "--tick-s", "0.2", *args], env=env,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def gateway(self) -> WorkerProcess:
        p = start_gateway(redis_url=self.redis_url, namespace=self.ns, log_dir=self.log_dir)
        self.procs.append(p)
        return p

    def _run(self, fn: Any) -> Any:
        async def go() -> Any:
            redis = Redis.from_url(self.redis_url, socket_timeout=60)  # CPU-starved CI
            try:
                return await fn(redis)
            finally:
                await redis.aclose()

        return asyncio.run(go())

    def instances(self) -> list[InstanceView]:
        keys = KeySchema(self.ns)
        views: list[InstanceView] = self._run(lambda r: StateStore(r, keys).list_instances())
        return views

    def active(self) -> list[InstanceView]:
        return [v for v in self.instances() if v.load and v.load.status.value == "active"]

    def events(self) -> list[Event]:
        keys = KeySchema(self.ns)
        events: list[Event] = self._run(lambda r: EventLog(r, keys.events).recent(1000))
        return events

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every process this stack started and wait until each process
        group is gone: the autoscalers' and the gateway's, and those of the
        instances still registered (an autoscaler's workers die with it; this
        is a safety net). What outlives ``grace_s`` after SIGTERM is SIGKILLed."""
        leftovers = self.instances()
        for p in reversed(self.procs):
            p.stop()
        groups = {p.proc.pid for p in self.procs}  # (each started in a group of its own)
        for v in leftovers:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(v.info.pid))
                os.kill(v.info.pid, signal.SIGTERM)
        groups.discard(os.getpgrp())  # (never the test's own)
        left = _wait_gone(groups, grace_s)
        for group in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        if _wait_gone(left, 10.0):
            raise RuntimeError(f"process groups {sorted(left)} outlived SIGKILL")


def _live_groups(groups: Iterable[int]) -> set[int]:
    """The ``groups`` with a process that is not a zombie (this container's
    init reaps orphans late)."""
    wanted, live = set(groups), set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) in wanted and proc.status() != psutil.STATUS_ZOMBIE:
                live.add(os.getpgid(proc.pid))
    return live


def _wait_gone(groups: Iterable[int], timeout_s: float) -> set[int]:
    """Wait until no process of ``groups`` runs; the groups still live after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (live := _live_groups(groups)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def stream(base_url: str, prompt: Any, max_tokens: int, out: dict[str, Any],
           model: str = "sim-model") -> None:  # fmt: skip
    """A streaming completion through the gateway; records text, usage, errors."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    text, events = [], []
    url = base_url + "/v1/completions"
    with httpx.Client(timeout=300) as client, client.stream("POST", url, json=body) as resp:
        out["status"] = resp.status_code
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if line[6:] == "[DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
            for choice in chunk.get("choices", []):
                text.append(choice["text"])
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
    out["text"], out["done"] = "".join(text), events.count("[DONE]")

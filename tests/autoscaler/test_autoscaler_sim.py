"""The autoscaler on a real stack of sim instances: local provider, real
Redis, a real gateway, real HTTP. Scale from zero and back to zero; a burst
scales out and a calm drains an instance by migration with every stream
finishing; the standby takes over when the leader is killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from autoscaler.events import Event, EventLog
from infra.keys import KeySchema
from infra.records import InstanceView
from infra.store import StateStore
from tests.helpers import REPO, SHOAL, WorkerProcess, start_autoscaler, start_gateway, wait_for

MODEL = "sim-model"


class Stack:
    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url, self.log_dir = redis_url, log_dir
        self.ns = f"as-{uuid.uuid4().hex[:6]}"
        self.procs: list[WorkerProcess] = []

    def autoscaler(self, name: str, *args: str) -> WorkerProcess:
        p = start_autoscaler(
            redis_url=self.redis_url, namespace=self.ns, log_dir=self.log_dir, name=name,
            args=["--engine", "sim", "--tick-s", "0.2", *args],
        )  # fmt: skip
        self.procs.append(p)
        return p

    def gateway(self) -> WorkerProcess:
        p = start_gateway(redis_url=self.redis_url, namespace=self.ns, log_dir=self.log_dir)
        self.procs.append(p)
        return p

    def _run(self, fn: Any) -> Any:
        async def go() -> Any:
            redis = Redis.from_url(self.redis_url)
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

    def stop(self) -> None:
        leftovers = self.instances()
        for p in reversed(self.procs):
            p.stop()
        for v in leftovers:  # instances of an autoscaler that was SIGKILLed
            with contextlib.suppress(ProcessLookupError):
                os.kill(v.info.pid, signal.SIGTERM)


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(redis_url, tmp_path)
    yield s
    s.stop()


def stream(base_url: str, prompt: str, max_tokens: int, out: dict[str, Any]) -> None:
    """A streaming completion through the gateway; records text, usage, errors."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
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


def test_scale_from_zero_and_back_to_zero(stack: Stack) -> None:
    stack.autoscaler("as-1", "--min-instances", "0", "--max-instances", "2",
                     "--idle-timeout-s", "2")  # fmt: skip
    gw = stack.gateway()
    models = lambda: [m["id"] for m in httpx.get(gw.base_url + "/v1/models").json()["data"]]  # noqa: E731
    wait_for(lambda: MODEL in models(), timeout_s=30)
    assert stack.instances() == []  # the model is offered with no instance running
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "ignore_eos": True}
    resp = httpx.post(gw.base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 8
    wait_for(lambda: stack.instances() == [], timeout_s=60)  # idle: scaled to zero
    kinds = [e.kind for e in stack.events()]
    assert kinds[:2] == ["leader", "scale_out"]
    assert "held with no instance" in stack.events()[1].data["reason"]
    assert kinds.index("drain") < kinds.index("stop")


def test_burst_scales_out_and_calm_drains_by_migration(stack: Stack) -> None:
    stack.autoscaler(
        "as-1", "--min-instances", "1", "--max-instances", "2", "--freeness-low", "10",
        "--freeness-high", "20", "--cooldown-s", "1",
        "--instance-args", "--num-sim-blocks 64 --max-num-seqs 16",
    )  # fmt: skip
    gw = stack.gateway()
    wait_for(lambda: len(stack.active()) == 1, timeout_s=60)
    burst: list[dict[str, Any]] = [{} for _ in range(8)]
    threads = [threading.Thread(target=stream, args=(gw.base_url, f"burst {i}", 100, out))
               for i, out in enumerate(burst)]  # fmt: skip
    for t in threads:
        t.start()
    wait_for(lambda: len(stack.active()) == 2, timeout_s=60)  # scaled out
    for t in threads:
        t.join(timeout=120)
    # Two long streams land one on each instance; the calm drains one of them.
    calm: list[dict[str, Any]] = [{}, {}]
    threads = [threading.Thread(target=stream, args=(gw.base_url, f"calm {i}", 400, out))
               for i, out in enumerate(calm)]  # fmt: skip
    for t in threads:
        t.start()
    wait_for(lambda: len(stack.instances()) == 1, timeout_s=60)  # scaled in
    for t in threads:
        t.join(timeout=120)
    for out, n in [*((b, 100) for b in burst), *((c, 400) for c in calm)]:
        assert out["status"] == 200 and "error" not in out, out
        assert out["usage"]["completion_tokens"] == n and out["done"] == 1, out
    events = stack.events()
    kinds = [e.kind for e in events]
    assert "scale_out" in kinds and "drain" in kinds and "stop" in kinds
    moved = [e for e in events if e.kind == "migrated" and "draining" in _reason_of(events, e)]
    assert any("migrated" in e.data["outcomes"] for e in moved), kinds


def _reason_of(events: list[Event], migrated: Event) -> str:
    """The reason of the migrate decision that led to ``migrated``."""
    decisions = [e for e in events if e.kind == "migrate"
                 and e.data["source"] == migrated.data["source"]
                 and e.timestamp <= migrated.timestamp]  # fmt: skip
    return str(decisions[-1].data["reason"]) if decisions else ""


def test_standby_takes_over_when_the_leader_dies(stack: Stack) -> None:
    first = stack.autoscaler("as-1", "--min-instances", "1", "--max-instances", "2")
    second = stack.autoscaler("as-2", "--min-instances", "1", "--max-instances", "2")
    wait_for(lambda: len(stack.active()) == 1, timeout_s=60)
    assert httpx.get(first.base_url + "/healthz").json()["leader"] is True
    assert httpx.get(second.base_url + "/healthz").json()["leader"] is False
    first.kill()  # SIGKILL: no clean release of the lease
    wait_for(lambda: httpx.get(second.base_url + "/healthz").json()["leader"], timeout_s=30)
    # Decisions continue: the instance dies and the new leader replaces it.
    victim = stack.active()[0]
    os.kill(victim.info.pid, signal.SIGKILL)
    wait_for(lambda: [v.info.instance_id for v in stack.active()] not in ([],
             [victim.info.instance_id]), timeout_s=60)  # fmt: skip
    by = [(e.kind, e.by) for e in stack.events()]
    assert ("leader", "as-1") in by and ("leader", "as-2") in by
    assert ("scale_out", "as-2") in by
    # Operators see the same through `shoal status`.
    env = {**os.environ, "SHOAL_REDIS_URL": stack.redis_url, "SHOAL_NAMESPACE": stack.ns}
    out = subprocess.run([*SHOAL, "status", "--json"], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    status = json.loads(out)
    assert status["autoscaler"]["leader"] == "as-2"
    assert any(e["kind"] == "scale_out" and e["by"] == "as-2" for e in status["events"])
    table = subprocess.run([*SHOAL, "status"], env=env, cwd=REPO, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "autoscaler: as-2" in table and "scale_out" in table

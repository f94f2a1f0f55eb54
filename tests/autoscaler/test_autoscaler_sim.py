"""The autoscaler on a real stack of sim instances: local provider, real
Redis, a real gateway, real HTTP. Scale from zero and back to zero; a burst
scales out and a calm drains an instance by migration with every stream
finishing; the standby takes over when the leader is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any

import httpx
import psutil

from infra.demand import DemandBoard
from infra.events import (
    Event,
    MigratedEvent,
    MigrateEvent,
    MigrationFailedEvent,
    ReadyEvent,
    ScaleOutEvent,
)
from infra.keys import KeySchema
from tests.autoscaler.stack import Stack, stream
from tests.helpers import REPO, SHOAL, start_gateway, wait_for

MODEL = "sim-model"


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
    events = stack.events()
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["leader", "scale_out"]
    assert isinstance(events[1].payload, ScaleOutEvent)
    assert "held with no instance" in events[1].payload.reason
    assert kinds.index("drain") < kinds.index("stop")
    ready = next(e.payload for e in events if isinstance(e.payload, ReadyEvent))
    assert ready.cold_start_s > 0  # measured from launch to the first active report


def test_burst_scales_out_and_calm_scales_in(stack: Stack) -> None:
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
    # Whatever the drained instance still ran moved without a failure (whether
    # it ran anything depends on timing here; tests/autoscaler/
    # test_autoscaler_vllm.py drains an instance with a stream deterministically).
    moved = [e.payload for e in events if isinstance(e.payload, MigratedEvent)
             and "draining" in _reason_of(events, e.timestamp, e.payload)]  # fmt: skip
    ok = {"migrated", "source_finished", "refused"}  # refused: retried on a later tick
    assert all(set(m.outcomes) <= ok for m in moved), moved
    assert not any(isinstance(e.payload, MigrationFailedEvent) for e in events), kinds


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (this container's init reaps late)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reason_of(events: list[Event], at: float, migrated: MigratedEvent) -> str:
    """The reason of the migrate decision that led to ``migrated`` (at ``at``)."""
    decisions = [e.payload for e in events if isinstance(e.payload, MigrateEvent)
                 and e.payload.source == migrated.source and e.timestamp <= at]  # fmt: skip
    return decisions[-1].reason if decisions else ""


def test_standby_takes_over_when_the_leader_dies(stack: Stack) -> None:
    first = stack.autoscaler("as-1", "--min-instances", "1", "--max-instances", "2")
    second = stack.autoscaler("as-2", "--min-instances", "1", "--max-instances", "2")
    wait_for(lambda: len(stack.active()) == 1, timeout_s=60)
    assert httpx.get(first.base_url + "/healthz").json()["leader"] is True
    assert httpx.get(second.base_url + "/healthz").json()["leader"] is False
    (orphan,) = stack.active()
    first.kill()  # SIGKILL: no clean release of the lease
    wait_for(lambda: httpx.get(second.base_url + "/healthz").json()["leader"], timeout_s=30)
    # The leader's instance dies with it (a provider's children never outlive
    # it), and the new leader starts another.
    wait_for(lambda: [v.info.instance_id for v in stack.active()] not in ([],
             [orphan.info.instance_id]), timeout_s=60)  # fmt: skip
    wait_for(lambda: _gone(orphan.info.pid), timeout_s=30)
    # Decisions continue: that instance dies too and the new leader replaces it.
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


def test_held_requests_get_503_with_retry_after_when_no_instance_comes(stack: Stack) -> None:
    """A model an autoscaler can start, but no instance ever arrives: the
    gateway holds the request for its hold timeout, then answers 503 with
    Retry-After; beyond the queue bound it answers 503 at once."""
    env = {"SHOAL_HOLD_TIMEOUT_S": "1", "SHOAL_MAX_HELD_REQUESTS": "1"}
    gw = start_gateway(
        redis_url=stack.redis_url, namespace=stack.ns, log_dir=stack.log_dir, env=env
    )
    stack.procs.append(gw)
    keys = KeySchema(stack.ns)
    stack._run(lambda r: DemandBoard(r, keys).publish_scalable([MODEL], ttl_s=60))
    wait_for(lambda: MODEL in str(httpx.get(gw.base_url + "/v1/models").json()), timeout_s=30)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(
        httpx.post(gw.base_url + "/v1/completions", json=body, timeout=30)))  # fmt: skip
    first.start()
    wait_for(lambda: "shoal_gateway_held_requests 1.0" in httpx.get(gw.base_url + "/metrics").text,
             timeout_s=10)  # fmt: skip
    second = httpx.post(gw.base_url + "/v1/completions", json=body, timeout=30)  # queue full
    first.join(timeout=30)
    for resp in (second, results[0]):
        assert resp.status_code == 503 and "retry-after" in resp.headers, resp.text
        assert resp.json()["error"]["type"] == "service_unavailable"
    assert "already wait" in second.json()["error"]["message"]
    assert "became ready" in results[0].json()["error"]["message"]

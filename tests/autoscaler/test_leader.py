"""The leader lease and the event log against a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from redis.asyncio import Redis

from autoscaler.leader import LeaderLease
from infra.events import DrainEvent, Event, EventLog, ScaleOutEvent


def _key() -> str:
    return f"test-leader-{uuid.uuid4().hex[:6]}"


async def test_one_holder_at_a_time_and_renewal(redis: Redis) -> None:
    key = _key()
    a, b = LeaderLease(redis, key, "a", ttl_s=5), LeaderLease(redis, key, "b", ttl_s=5)
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.acquire()  # renewal
    assert await a.current() == "a"
    await a.release()
    assert await b.acquire()
    await a.release()  # not a's to release any more
    assert await b.current() == "b"


async def test_standby_takes_over_when_the_lease_expires(redis: Redis) -> None:
    key = _key()
    a, b = LeaderLease(redis, key, "a", ttl_s=0.3), LeaderLease(redis, key, "b", ttl_s=0.3)
    assert await a.acquire()
    assert not await b.acquire()
    await asyncio.sleep(0.5)  # a stopped renewing (crashed)
    assert await b.acquire()
    assert not await a.acquire()  # the old leader learns it lost


async def test_events_keep_order_and_fields(redis: Redis) -> None:
    log = EventLog(redis, _key(), max_len=100, clock=lambda: 1000.5)
    await log.record("as-1", ScaleOutEvent(count=1, reason="burst", instance_seconds=0.0))
    drain = DrainEvent(instance_id="i-1", reason="idle", instance_seconds=12.5)
    await log.record("as-1", drain)
    events = await log.recent(10)
    assert [e.kind for e in events] == ["scale_out", "drain"]
    assert events[1].payload == drain and events[1].by == "as-1"
    assert [e.kind for e in await log.recent(1)] == ["drain"]
    # The stream keeps its format: ts, kind, by and the other fields as JSON.
    rows: Any = await redis.xrevrange(log.key, count=1)
    assert {k.decode(): v.decode() for k, v in rows[0][1].items()} == {
        "ts": "1000.5", "kind": "drain", "by": "as-1",
        "data": '{"reason":"idle","instance_seconds":12.5,"instance_id":"i-1"}',
    }  # fmt: skip
    # `shoal status --json` prints events flat, and reads them back.
    flat = events[1].model_dump(mode="json")
    assert flat == {"timestamp": 1000.5, "kind": "drain", "by": "as-1", "instance_id": "i-1",
                    "reason": "idle", "instance_seconds": 12.5}  # fmt: skip
    assert Event.model_validate(flat) == events[1]


async def test_entries_of_unknown_kinds_are_skipped(redis: Redis) -> None:
    log = EventLog(redis, _key(), max_len=100)
    await redis.xadd(log.key, {"ts": "1.0", "kind": "from_the_future", "by": "x", "data": "{}"})
    await redis.xadd(log.key, {"ts": "2.0", "kind": "drain", "by": "x", "data": "not json"})
    await log.record("as-1", ScaleOutEvent(count=2, reason="burst", instance_seconds=1.0))
    assert [e.kind for e in await log.recent(10)] == ["scale_out"]

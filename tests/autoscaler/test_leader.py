"""The leader lease and the event log against a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis

from autoscaler.leader import LeaderLease
from infra.events import EventLog


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
    log = EventLog(redis, _key(), max_len=100)
    await log.record("scale_out", "as-1", count=1, reason="burst")
    await log.record("drain", "as-1", instance_id="i-1", reason="idle")
    events = await log.recent(10)
    assert [e.kind for e in events] == ["scale_out", "drain"]
    assert events[1].data == {"instance_id": "i-1", "reason": "idle"} and events[1].by == "as-1"
    assert [e.kind for e in await log.recent(1)] == ["drain"]

"""The Redis state store against a real Valkey server."""

from __future__ import annotations

import asyncio
import math
import uuid

from redis.asyncio import Redis

from infra.keys import KeySchema
from infra.records import (
    InstanceInfo,
    InstanceStatus,
    InstanceView,
    LoadReport,
    PriorityCounts,
)
from infra.store import StateStore


def info(instance_id: str, status: InstanceStatus = InstanceStatus.ACTIVE) -> InstanceInfo:
    return InstanceInfo(
        instance_id=instance_id, address="http://127.0.0.1:1", model="m", engine="sim",
        status=status, pid=1, hostname="h", started_at=0.0, block_size=16,
        num_blocks_total=100, max_num_seqs=8, max_model_len=256,
    )  # fmt: skip


def report(instance_id: str, freeness: float = math.inf) -> LoadReport:
    return LoadReport(
        instance_id=instance_id, seq=1, timestamp=0.0, status=InstanceStatus.ACTIVE,
        num_blocks_total=100, num_blocks_used=0, num_running=0, num_waiting=0,
        num_preempted_total=0, running_by_priority=PriorityCounts(),
        waiting_by_priority=PriorityCounts(), virtual_usage=0.0, freeness=freeness,
    )  # fmt: skip


def store(redis: Redis) -> StateStore:
    return StateStore(redis, KeySchema(f"test-{uuid.uuid4().hex[:8]}"))


async def test_publish_and_list_round_trips_typed_records(redis: Redis) -> None:
    s = store(redis)
    await s.publish(info("b"), report("b"), ttl_s=5)
    await s.publish(info("a"), None, ttl_s=5)
    views = await s.list_instances()
    assert [v.info.instance_id for v in views] == ["a", "b"]
    assert views[0].load is None
    assert views[1].load is not None and math.isinf(views[1].load.freeness)


async def test_infinite_freeness_is_stored_as_standard_json(redis: Redis) -> None:
    s = store(redis)
    await s.publish(info("x"), report("x", freeness=-math.inf), ttl_s=5)
    raw = await redis.get(s.keys.load("x"))
    assert isinstance(raw, bytes)
    assert b'"freeness":"-Infinity"' in raw


async def test_instance_disappears_when_heartbeat_stops(redis: Redis) -> None:
    s = store(redis)
    await s.publish(info("dead"), report("dead"), ttl_s=0.2)
    await s.publish(info("alive"), report("alive"), ttl_s=30)
    await asyncio.sleep(0.4)
    assert [v.info.instance_id for v in await s.list_instances()] == ["alive"]
    assert await redis.sismember(s.keys.instances_index, "dead") == 0


async def test_deregister_removes_every_key(redis: Redis) -> None:
    s = store(redis)
    await s.publish(info("gone"), report("gone"), ttl_s=30)
    await s.deregister("gone")
    assert await s.list_instances() == []
    assert await s.get_instance("gone") is None
    assert await redis.exists(s.keys.instance("gone"), s.keys.load("gone")) == 0


async def test_get_instance(redis: Redis) -> None:
    s = store(redis)
    await s.publish(info("one", InstanceStatus.DRAINING), report("one"), ttl_s=30)
    view = await s.get_instance("one")
    assert isinstance(view, InstanceView) and view.info.status is InstanceStatus.DRAINING

"""Typed access to the Redis state: the instance registry and load reports.

The store owns no connection policy: it is handed a ``redis.asyncio.Redis``
client, so tests and production use the same code against a real server.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from redis.asyncio import Redis

from infra.keys import KeySchema
from infra.records import InstanceInfo, InstanceView, LoadReport

log = logging.getLogger(__name__)


class StateStore:
    """Registry and load records of Shoal instances in Redis."""

    def __init__(self, redis: Redis, keys: KeySchema) -> None:
        self._redis = redis
        self.keys = keys

    @property
    def redis(self) -> Redis:
        return self._redis

    async def publish(
        self,
        info: InstanceInfo,
        load: LoadReport | None,
        ttl_s: float,
        reflected: Collection[str] = (),
    ) -> None:
        """Write the registry entry and (optionally) the load report, both
        expiring after ``ttl_s``; this is the heartbeat. ``reflected``: the
        requests the report counts for the first time, whose gateway
        reservations end in the same transaction (a request is always counted
        once: in a reservation or in the report, never in neither)."""
        ttl_ms = max(1, int(ttl_s * 1000))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.instance(info.instance_id), info.model_dump_json(), px=ttl_ms)
            if load is not None:
                pipe.set(self.keys.load(info.instance_id), load.model_dump_json(), px=ttl_ms)
                if reflected:
                    pipe.zrem(self.keys.reserved(info.instance_id), *reflected)
            pipe.sadd(self.keys.instances_index, info.instance_id)
            await pipe.execute()

    async def deregister(self, instance_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.instance(instance_id), self.keys.load(instance_id))
            pipe.srem(self.keys.instances_index, instance_id)
            await pipe.execute()

    async def list_instances(self) -> list[InstanceView]:
        """Every live instance with its latest load, sorted by id. Ids whose
        registry entry has expired are pruned from the index."""
        views, _ = await self.list_with_reservations(None)
        return views

    async def list_with_reservations(
        self, reserved_since_ms: int | None
    ) -> tuple[list[InstanceView], dict[str, int]]:
        """:meth:`list_instances`, and each instance's count of gateway
        reservations its load report does not count yet (those scored from
        ``reserved_since_ms`` on; none asked when None). Loads and counts come
        from one transaction: a report published between two reads would
        otherwise have its requests counted in neither."""
        ids = sorted(
            m.decode() if isinstance(m, bytes) else m
            for m in await self._redis.smembers(self.keys.instances_index)
        )
        if not ids:
            return [], {}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.mget([self.keys.instance(i) for i in ids])
            pipe.mget([self.keys.load(i) for i in ids])
            if reserved_since_ms is not None:
                for i in ids:
                    pipe.zcount(self.keys.reserved(i), reserved_since_ms, "+inf")
            infos, loads, *counts = await pipe.execute()
        reserved = {i: int(n) for i, n in zip(ids, counts, strict=False)}
        views: list[InstanceView] = []
        dead: list[str] = []
        for instance_id, raw_info, raw_load in zip(ids, infos, loads, strict=True):
            if raw_info is None:
                dead.append(instance_id)
                continue
            info = InstanceInfo.model_validate_json(raw_info)
            load = LoadReport.model_validate_json(raw_load) if raw_load is not None else None
            views.append(InstanceView(info=info, load=load))
        if dead:
            log.info("pruning %d expired instance(s): %s", len(dead), dead)
            await self._redis.srem(self.keys.instances_index, *dead)
        return views, reserved

    async def get_instance(self, instance_id: str) -> InstanceView | None:
        raw_info, raw_load = await self._redis.mget(
            [self.keys.instance(instance_id), self.keys.load(instance_id)]
        )
        if raw_info is None:
            return None
        load = LoadReport.model_validate_json(raw_load) if raw_load is not None else None
        return InstanceView(info=InstanceInfo.model_validate_json(raw_info), load=load)

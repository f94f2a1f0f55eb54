"""Demand at zero: requests a gateway holds because no instance can take
them, and the models an autoscaler can start (so a gateway holds a request
for a model with no instance instead of answering 404)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from redis.asyncio import Redis

from infra.keys import KeySchema


class DemandBoard:
    def __init__(
        self, redis: Redis, keys: KeySchema, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock

    async def hold(self, request_id: str) -> None:
        await self._redis.zadd(self._keys.held, {request_id: int(self._clock() * 1000)})

    async def release(self, request_id: str) -> None:
        await self._redis.zrem(self._keys.held, request_id)

    async def num_held(self, max_age_s: float) -> int:
        """Requests held now; entries older than ``max_age_s`` (left by a
        gateway that died) are dropped."""
        oldest = int((self._clock() - max_age_s) * 1000)
        await self._redis.zremrangebyscore(self._keys.held, "-inf", f"({oldest}")
        return int(await self._redis.zcard(self._keys.held))

    async def publish_scalable(self, models: list[str], ttl_s: float) -> None:
        await self._redis.set(self._keys.scalable, json.dumps(sorted(models)),
                              px=max(1, int(ttl_s * 1000)))  # fmt: skip

    async def scalable(self) -> list[str]:
        raw = await self._redis.get(self._keys.scalable)
        return [] if raw is None else list(json.loads(raw))

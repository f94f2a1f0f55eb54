"""In-flight reservations: requests dispatched to an instance but not yet
reflected in its LoadReport, kept atomically in Redis so that gateway replicas
do not all herd onto the instance that looked freest a moment ago.

A reservation is a member of ``<ns>:reserved:<id>`` scored by its dispatch time
(ms). It counts while it is newer than the instance's latest LoadReport: from
the first report after it, the instance itself accounts for the request. Failed
attempts are released at once; everything else expires after ``ttl_s``.
(Gateway and instance clocks are assumed to agree to within a report interval.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from infra.keys import KeySchema

# KEYS[1]: reservation set. ARGV: now_ms, ttl_ms, request id, since_ms (report time).
# Drops expired members, adds this one, and returns how many are newer than since_ms
# (this one included): the dispatcher compares that with what it expected to see.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCOUNT', KEYS[1], ARGV[4], '+inf')
"""


class Reservations:
    def __init__(
        self, redis: Redis, keys: KeySchema, ttl_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = int(ttl_s * 1000)
        self._clock = clock
        self._reserve = redis.register_script(_RESERVE)

    async def reserve(self, instance_id: str, request_id: str, *, since: float) -> int:
        """Reserve a slot; returns the instance's count of unreflected
        reservations (newer than its report time ``since``), this one included."""
        count = await self._reserve(
            keys=[self._keys.reserved(instance_id)],
            args=[int(self._clock() * 1000), self._ttl_ms, request_id, int(since * 1000)],
        )
        return int(count)

    async def release(self, instance_id: str, request_id: str) -> None:
        await self._redis.zrem(self._keys.reserved(instance_id), request_id)

    async def counts(self, since: dict[str, float]) -> dict[str, int]:
        """Reservations per instance newer than its latest report time."""
        ids: Sequence[str] = list(since)
        if not ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.zcount(self._keys.reserved(i), int(since[i] * 1000), "+inf")
            results = await pipe.execute()
        return {i: int(n) for i, n in zip(ids, results, strict=True)}

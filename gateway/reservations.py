"""In-flight reservations: requests dispatched to an instance but not yet
reflected in its LoadReport, kept atomically in Redis so that gateway replicas
do not all herd onto the instance that looked freest a moment ago.

A reservation is a member of ``<ns>:reserved:<id>`` scored by its expiry; it is
released when the request's first token arrives (the instance's reports count
it from then on) or when the attempt fails, and expires on its own otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from infra.keys import KeySchema

# KEYS[1] reservation set; ARGV: now_ms, ttl_ms, request id, expected count (-1: any).
# Returns {1, count} when reserved, {0, count} when the set grew past `expected`
# since the caller looked (another replica reserved here first).
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
local expected = tonumber(ARGV[4])
if expected >= 0 and n > expected then
  return {0, n}
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, n + 1}
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

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def reserve(self, instance_id: str, request_id: str, expected: int = -1) -> bool:
        ok, _ = await self._reserve(
            keys=[self._keys.reserved(instance_id)],
            args=[self._now_ms(), self._ttl_ms, request_id, expected],
        )
        return bool(ok)

    async def release(self, instance_id: str, request_id: str) -> None:
        await self._redis.zrem(self._keys.reserved(instance_id), request_id)

    async def counts(self, instance_ids: Sequence[str]) -> dict[str, int]:
        """Live reservations per instance."""
        if not instance_ids:
            return {}
        now = self._now_ms()
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in instance_ids:
                pipe.zcount(self._keys.reserved(i), now, "+inf")
            results = await pipe.execute()
        return {i: int(n) for i, n in zip(instance_ids, results, strict=True)}

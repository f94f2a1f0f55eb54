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

# KEYS[1]: reservation set. ARGV: now_ms, ttl_ms, request id, since_ms (report time),
# expected count (-1: any). Returns {1, n} when reserved, {0, n} when more than
# `expected` reservations newer than `since_ms` exist (another replica got here first).
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local n = redis.call('ZCOUNT', KEYS[1], ARGV[4], '+inf')
local expected = tonumber(ARGV[5])
if expected >= 0 and n > expected then
  return {0, n}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
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

    async def reserve(
        self, instance_id: str, request_id: str, *, since: float, expected: int = -1
    ) -> tuple[bool, int]:
        """Reserve a slot unless more than ``expected`` unreflected reservations
        (newer than the report time ``since``) already exist. Returns whether it
        reserved and the instance's count of unreflected reservations."""
        ok, count = await self._reserve(
            keys=[self._keys.reserved(instance_id)],
            args=[int(self._clock() * 1000), self._ttl_ms, request_id, int(since * 1000), expected],
        )
        return bool(ok), int(count)

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

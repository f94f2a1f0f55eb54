"""In-flight reservations: requests dispatched to an instance but not yet
reflected in its LoadReport, kept atomically in Redis so that gateway replicas
do not all herd onto the instance that looked freest a moment ago.

A reservation is a member of ``<ns>:reserved:<id>`` (the request id, scored by
its dispatch time in ms). It counts until the instance publishes the first
report that counts the request: the instance removes it in the same Redis
transaction as that report (``StateStore.publish``), so a request is counted
exactly once however long its trip to the instance takes. Failed attempts are
released at once; a reservation whose request never arrived expires after
``ttl_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis

from infra.keys import KeySchema

# KEYS[1]: reservation set. ARGV: now_ms, ttl_ms, request id.
# Drops expired members, adds this one, and returns how many there are (this one
# included): the dispatcher compares that with what it expected to see.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
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

    async def reserve(self, instance_id: str, request_id: str) -> int:
        """Reserve a slot; returns the instance's count of unreflected
        reservations, this one included."""
        count = await self._reserve(
            keys=[self._keys.reserved(instance_id)],
            args=[int(self._clock() * 1000), self._ttl_ms, request_id],
        )
        return int(count)

    async def release(self, instance_id: str, request_id: str) -> None:
        await self._redis.zrem(self._keys.reserved(instance_id), request_id)

    def live_since_ms(self) -> int:
        """Reservations scored before this (ms) have expired: their request
        never reached its instance."""
        return int(self._clock() * 1000) - self._ttl_ms

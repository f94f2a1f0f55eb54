"""One active autoscaler: a lease in Redis. The holder renews it every tick;
a standby takes it over once it expires (within ``ttl_s`` of the holder's
last renewal). Acquire and renew are one atomic script."""

from __future__ import annotations

from redis.asyncio import Redis

# KEYS[1] lease key; ARGV[1] holder id, ARGV[2] ttl in ms.
# Take the lease if free, renew it if ours; returns 1 when we hold it.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLease:
    def __init__(self, redis: Redis, key: str, holder: str, ttl_s: float) -> None:
        self._redis = redis
        self.key = key
        self.holder = holder
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        """Take or renew the lease; False while another holder has it."""
        return bool(await self._acquire(keys=[self.key], args=[self.holder, self._ttl_ms]))

    async def release(self) -> None:
        """Give the lease up at once (a clean shutdown) if we hold it."""
        await self._release(keys=[self.key], args=[self.holder])

    async def current(self) -> str | None:
        raw = await self._redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

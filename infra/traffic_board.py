"""The traffic every gateway replica records, shared through Redis: each
replica publishes a ``TrafficBatch`` per flush to the capped stream
``<ns>:traffic``, and the autoscaler reads the last window of all of them
back into one ``Traffic`` (docs/STATE.md).

Times are the Redis server's (the stream ids), so replicas' and the
autoscaler's clocks need not agree.
"""

from __future__ import annotations

import json
import logging

from redis.asyncio import Redis

from infra.keys import KeySchema
from infra.traffic import DEFAULT_RATE_WINDOW_S, DEFAULT_WINDOW_S, Traffic, TrafficBatch, TrafficLog

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 20_000
"""Stream cap: a second's flush of each of 100 replicas for 200 s."""


class TrafficBoard:
    def __init__(
        self, redis: Redis, keys: KeySchema, *, window_s: float = DEFAULT_WINDOW_S,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S, max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:  # fmt: skip
        self._redis = redis
        self.key = keys.traffic
        self.window_s, self.rate_window_s = window_s, rate_window_s
        self._max_entries = max_entries

    async def publish(self, batch: TrafficBatch) -> None:
        if batch.empty:
            return
        fields = {"b": json.dumps(batch.to_json(), separators=(",", ":"))}
        await self._redis.xadd(self.key, fields, maxlen=self._max_entries, approximate=True)  # type: ignore[arg-type]

    async def summary(self) -> Traffic:
        """Every replica's batches of the last window, merged at their times."""
        seconds, micros = await self._redis.time()
        now = seconds + micros / 1e6
        since_ms = int((now - max(self.window_s, self.rate_window_s)) * 1000)
        rows = await self._redis.xrange(self.key, min=str(since_ms), max="+")
        traffic = TrafficLog(self.window_s, self.rate_window_s)
        for entry_id, raw in rows or []:
            ident = _text(entry_id)
            at = int(ident.split("-", 1)[0]) / 1000
            fields = {_text(k): v for k, v in (raw or {}).items()}
            try:
                traffic.add(at, TrafficBatch.from_json(json.loads(fields["b"])))
            except (KeyError, ValueError, TypeError) as exc:
                log.debug("skipping traffic entry %s: %r", ident, exc)
        return traffic.summary(now)


def _text(x: bytes | str | None) -> str:
    return x.decode() if isinstance(x, bytes) else (x or "")

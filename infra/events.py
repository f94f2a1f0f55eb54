"""The event log: every decision the autoscaler takes, with its reason, in a
capped Redis stream (``<ns>:events``), for ``shoal status`` and operators."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis


@dataclass(frozen=True)
class Event:
    timestamp: float
    kind: str
    by: str
    """The autoscaler that recorded it."""
    data: dict[str, Any]


class EventLog:
    def __init__(
        self, redis: Redis, key: str, *, max_len: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._redis = redis
        self.key = key
        self._max_len = max_len
        self._clock = clock

    async def record(self, kind: str, by: str, **data: Any) -> None:
        fields = {"ts": repr(self._clock()), "kind": kind, "by": by,
                  "data": json.dumps(data, default=str)}  # fmt: skip
        await self._redis.xadd(self.key, fields, maxlen=self._max_len, approximate=True)  # type: ignore[arg-type]

    async def recent(self, count: int = 20) -> list[Event]:
        """Newest last."""
        rows = await self._redis.xrevrange(self.key, count=count)
        events = []
        for _id, raw in reversed(rows or []):
            f = {_s(k): _s(v) for k, v in (raw or {}).items()}
            events.append(Event(float(f["ts"]), f["kind"], f["by"], json.loads(f["data"])))
        return events


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x

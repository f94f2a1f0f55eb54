"""The destination side of a live migration: block reservations with a free
watermark, staging through the engine's KV port, and the commit that adopts
the request. A migration whose source goes quiet is dropped after a timeout,
returning its reservation and staging memory."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from infra.errors import ShoalError
from migration.plan import admits
from migration.ports import KvPort
from migration.protocol import ArrivalRecord, CommitReply, ResumeSpec
from migration.wire import WireError

log = logging.getLogger(__name__)


class NoRoom(ShoalError):
    """The destination cannot take the blocks without crossing its watermark."""

    status_code = 409
    error_type = "conflict"


class StageFailed(ShoalError):
    """Pulling blocks from the source failed (source gone or request changed)."""

    status_code = 502
    error_type = "upstream_error"


class Adopter(Protocol):
    """The instance: runs a migrated-in request, holding its output for the client."""

    async def adopt(self, spec: ResumeSpec) -> asyncio.Future[bool]:
        """Start the request of ``spec`` and return once the engine has
        admitted it (raise if it could not); the future resolves at its first
        token (True), or at its end without one (False)."""
        ...


@dataclass
class _Incoming:
    blocks: int = 0
    touched: float = field(default_factory=time.monotonic)


ARRIVALS = 256
"""Migrated-in requests the inbox remembers (``GET /migrations``)."""


class Inbox:
    def __init__(
        self,
        free_blocks: Callable[[], int],
        port: KvPort | None,
        *,
        watermark_blocks: int = 4,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_arrival: Callable[[ArrivalRecord], None] = lambda a: None,
    ) -> None:
        self._free_blocks = free_blocks
        self._port = port
        self._watermark = watermark_blocks
        self._timeout_s = timeout_s
        self._clock = clock
        self._on_arrival = on_arrival
        self._incoming: dict[str, _Incoming] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        self.arrivals: collections.deque[ArrivalRecord] = collections.deque(maxlen=ARRIVALS)

    @property
    def reserved_blocks(self) -> int:
        return sum(i.blocks for i in self._incoming.values())

    @property
    def in_flight(self) -> list[str]:
        return sorted(self._incoming)

    def reserve(self, key: str, num_blocks: int) -> None:
        """Hold ``num_blocks`` in total for ``key`` (growing stage by stage)."""
        entry = self._incoming.setdefault(key, _Incoming())
        free = self._free_blocks() - self.reserved_blocks
        extra = num_blocks - entry.blocks
        if not admits(free, extra, self._watermark):
            if entry.blocks == 0:
                del self._incoming[key]
            raise NoRoom(f"{extra} more blocks would leave {free - extra} free "
                         f"(watermark {self._watermark})")  # fmt: skip
        entry.blocks = max(entry.blocks, num_blocks)
        entry.touched = self._clock()

    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int, grant: str) -> int:  # fmt: skip
        if key not in self._incoming:
            raise NoRoom(f"migration {key} holds no reservation here")
        if self._port is None:
            raise NoRoom("this instance cannot receive KV (no KV port)")
        self._incoming[key].touched = self._clock()
        try:
            return await self._port.stage(key, source, engine_request_id, first, count, grant)
        except WireError as exc:
            raise StageFailed(str(exc)) from exc

    async def commit(self, spec: ResumeSpec, adopter: Adopter) -> CommitReply:
        """Pull the final blocks if the spec names any, then adopt the
        request; returns once the engine has admitted it (the hand-off)."""
        t0 = self._clock()
        final_bytes = 0
        if spec.final is not None:
            f = spec.final
            if f.key != spec.key:
                raise StageFailed(f"final stage of {f.key!r} in the commit of {spec.key!r}")
            self.reserve(spec.key, f.first + f.count)
            final_bytes = await self.stage(spec.key, f.source, f.engine_request_id, f.first,
                                           f.count, f.grant)  # fmt: skip
        t1 = self._clock()
        self._incoming.pop(spec.key, None)  # its blocks now belong to the request
        try:
            first = await adopter.adopt(spec)
        except BaseException:
            await self._drop_staged(spec.key)
            raise
        t2 = self._clock()
        arrival = ArrivalRecord(key=spec.key, request_id=spec.request_id,
                                mode="kv" if spec.num_kv_tokens else "recompute",
                                frozen_for_s=spec.frozen_for_s, final_copy_s=t1 - t0,
                                admit_s=t2 - t1)  # fmt: skip
        # The engine loads the staged KV when it schedules the request, which
        # may be after a queue: keep it until the request has run (or ended).
        task = asyncio.create_task(self._after_first(first, arrival, t0),
                                   name=f"arrival-{spec.key}")  # fmt: skip
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return CommitReply(admitted_s=t2 - t1, final_copy_s=t1 - t0, final_bytes=final_bytes)

    async def _after_first(self, first: asyncio.Future[bool], arrival: ArrivalRecord,
                           t0: float) -> None:  # fmt: skip
        """At the request's first token here: complete its record (with the
        load time its port reports), then drop what is left staged."""
        with contextlib.suppress(asyncio.CancelledError):
            if await first:
                now = self._clock()
                arrival.first_step_s = now - t0 - arrival.final_copy_s - arrival.admit_s
                arrival.downtime_s = arrival.frozen_for_s + now - t0
        if self._port is not None and arrival.mode == "kv":
            with contextlib.suppress(Exception):
                status = await self._port.status()
                arrival.load_s = status.load_s.get(arrival.key)
                started = status.load_at.get(arrival.key)
                if started is not None and self._clock is time.monotonic:
                    arrival.wait_s = max(0.0, started - (t0 + arrival.final_copy_s
                                                         + arrival.admit_s))  # fmt: skip
        self.arrivals.append(arrival)
        self._on_arrival(arrival)
        await self._drop_staged(arrival.key)

    async def _drop_staged(self, key: str) -> None:
        if self._port is None:
            return
        try:
            await self._port.drop(key)
        except Exception as exc:  # the engine is gone: nothing is left to drop
            log.warning("could not drop staged KV of %s: %s", key, exc)

    async def abort(self, key: str) -> None:
        self._incoming.pop(key, None)
        if self._port is not None:
            await self._port.drop(key)

    async def expire(self) -> None:
        """Drop migrations whose source has gone quiet."""
        now = self._clock()
        for key, entry in list(self._incoming.items()):
            if now - entry.touched > self._timeout_s:
                log.warning("migration %s timed out: dropping its reservation", key)
                with contextlib.suppress(Exception):
                    await self.abort(key)

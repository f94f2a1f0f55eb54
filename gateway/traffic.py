"""What this gateway replica sees of demand and latency, published for the
autoscaler's ``slo`` policy: arrivals, tokens of finished requests and
per-priority TTFT/TPOT, batched in memory and flushed to ``<ns>:traffic``
once a second (``infra.traffic_board``). A flush that fails is dropped: the
autoscaler then sees a little less traffic for a second, never a stalled
request."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from infra.records import Priority
from infra.traffic import TrafficBatch
from infra.traffic_board import TrafficBoard

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0


class TrafficRecorder:
    def __init__(self) -> None:
        self._batch = TrafficBatch()

    def arrived(self) -> None:
        self._batch.arrivals += 1

    def first_token(self, priority: Priority, ttft_s: float) -> None:
        self._batch.ttft.setdefault(priority, []).append(ttft_s)

    def finished(self, priority: Priority, tpot_s: float) -> None:
        self._batch.tpot.setdefault(priority, []).append(tpot_s)

    def served(self, tokens: int) -> None:
        self._batch.tokens += tokens

    def take(self) -> TrafficBatch:
        """What was recorded since the last take."""
        batch, self._batch = self._batch, TrafficBatch()
        return batch

    async def run(
        self, board: TrafficBoard, stop: asyncio.Event, interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        """Flush every ``interval_s`` until ``stop``, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            try:
                await board.publish(self.take())
            except Exception as exc:  # Redis away: this second's traffic is lost, nothing else
                log.debug("traffic flush failed: %s", exc)

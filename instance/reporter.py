"""The load reporter: turns the engine's state into a LoadReport and publishes
it (with the registry heartbeat) to Redis every ``interval_s``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from infra.records import InstanceInfo, InstanceStatus, LoadReport
from infra.store import StateStore
from instance.engine import Engine, EngineLoad
from instance.load import count_by_priority, freeness
from instance.metrics import InstanceMetrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class ReporterConfig:
    """How an instance publishes its LoadReport to Redis."""

    interval_s: float = 0.05
    """Period of the reports (Llumnix-style 50-100 ms)."""
    ttl_s: float = 3.0
    """Lifetime of the registry and load records: a silent instance disappears."""
    headroom_blocks: int = 32
    """Virtual usage a high-priority request adds to its instance (Llumnix headroom)."""
    rate_window_s: float = 1.0
    """Window of the generation tokens/s figure."""


def make_report(
    info: InstanceInfo,
    load: EngineLoad,
    *,
    seq: int,
    timestamp: float,
    headroom_blocks: int,
    generation_tokens_per_s: float = 0.0,
) -> LoadReport:
    """The LoadReport of an instance in ``info.status`` whose engine reports
    ``load``. Pure: the reporter publishes these, and the cluster simulator
    (``bench/simulator``) builds its instances' reports with it."""
    figures = freeness(load, status=info.status, headroom_blocks=headroom_blocks)
    return LoadReport(
        instance_id=info.instance_id,
        seq=seq,
        timestamp=timestamp,
        status=info.status,
        num_blocks_total=load.num_blocks_total,
        num_blocks_used=load.num_blocks_used,
        num_running=len(load.running),
        num_waiting=len(load.waiting),
        num_preempted_total=load.num_preempted_total,
        running_by_priority=count_by_priority(list(load.running)),
        waiting_by_priority=count_by_priority(list(load.waiting)),
        virtual_usage=figures.virtual_usage,
        freeness=figures.freeness,
        generation_tokens_per_s=generation_tokens_per_s,
        num_finished_total=load.num_finished_total,
    )


class LoadReporter:
    def __init__(
        self,
        engine: Engine,
        store: StateStore | None,
        info: Callable[[], InstanceInfo],
        config: ReporterConfig,
        metrics: InstanceMetrics | None = None,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._engine = engine
        self._store = store
        self._info = info
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._seq = 0
        self._history: deque[tuple[float, int]] = deque()
        self.latest: LoadReport | None = None
        self._admitted: set[str] = set()

    def admitted(self, request_id: str) -> None:
        """The engine has taken ``request_id``: from the next report on, that
        report counts it, and its gateway reservation ends with that report."""
        self._admitted.add(request_id)

    def build_report(self) -> LoadReport:
        info = self._info()
        now = self._clock()
        load = self._engine.load()
        self._seq += 1
        report = make_report(
            info,
            load,
            seq=self._seq,
            timestamp=now,
            headroom_blocks=self._config.headroom_blocks,
            generation_tokens_per_s=self._rate(now, load.num_generation_tokens_total),
        )
        self.latest = report
        if self._metrics is not None:
            self._metrics.observe_load(report)
        return report

    def _rate(self, now: float, total: int) -> float:
        self._history.append((now, total))
        while len(self._history) > 2 and now - self._history[0][0] > self._config.rate_window_s:
            self._history.popleft()
        t0, n0 = self._history[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    async def publish_once(self) -> LoadReport:
        # Taken with the engine's load, before any await: a request admitted
        # while the report travels waits for the next one.
        reflected, self._admitted = self._admitted, set()
        report = self.build_report()
        if self._store is not None:
            try:
                await self._store.publish(self._info(), report, self._config.ttl_s, reflected)
            except BaseException:
                self._admitted |= reflected
                raise
        if self._metrics is not None:
            self._metrics.reports.inc()
        return report

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set; Redis errors are logged and retried."""
        failures = 0
        while not stop.is_set():
            if self._info().status is InstanceStatus.STOPPED:
                return
            try:
                await self.publish_once()
                failures = 0
            except Exception as exc:  # Redis down: keep trying, quietly
                failures += 1
                if self._metrics is not None:
                    self._metrics.report_errors.inc()
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("load report failed (%d in a row): %s", failures, exc)
            await self._sleep(self._config.interval_s)

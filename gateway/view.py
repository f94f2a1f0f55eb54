"""The gateway's local view of the cluster, refreshed from Redis.

Reads the registry, the load reports and the reservation counts every
``refresh_interval_s``. When Redis is unreachable the last view stays in use
for ``max_staleness_s`` (the gateway reports not-ready meanwhile) and the view
recovers by itself when Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.policies import Candidate
from gateway.reservations import Reservations
from infra.demand import DemandBoard
from infra.records import InstanceStatus, InstanceView
from infra.store import StateStore

log = logging.getLogger(__name__)


STALE_REPORT_S = 1.0
"""An instance whose last load report is this much older than the newest in
the view (20 report periods) has stopped reporting: it died, or its event loop
is stuck. Its registry entry outlives it by the heartbeat TTL (3 s); dispatch
skips it meanwhile, so a request is not sent to a dead instance and retried."""


@dataclass(frozen=True)
class Snapshot:
    """The cluster at one refresh: what dispatch ranks from."""

    instances: tuple[InstanceView, ...] = ()
    """Every registered instance with its latest load report (if any)."""
    reserved: dict[str, int] = field(default_factory=dict)
    """Reservations per instance (by any replica) not yet in its load report."""
    taken_at: float = 0.0
    """When the refresh that made it succeeded (the view's clock)."""
    scalable: tuple[str, ...] = ()
    """Models an autoscaler can start instances of (even when none run)."""

    def note_reserved(self, instance_id: str, count: int) -> None:
        """Record the instance's unreflected reservations as Redis just counted
        them, until the next refresh brings every count."""
        self.reserved[instance_id] = max(self.reserved.get(instance_id, 0), count)

    def models(self) -> list[str]:
        return sorted({v.info.model for v in self.instances} | set(self.scalable))

    def candidates(
        self, model: str, exclude: set[str], pending: dict[str, int] | None = None
    ) -> list[Candidate]:
        """Active instances serving ``model`` with a load report that is not
        stale; ``pending`` adds reservations of this replica still on their
        way to Redis."""
        pending = pending or {}
        reports = [v.load.timestamp for v in self.instances if v.load is not None]
        current = max(reports, default=0.0) - STALE_REPORT_S
        return [
            Candidate(
                v.info,
                v.load,
                self.reserved.get(v.info.instance_id, 0) + pending.get(v.info.instance_id, 0),
            )
            for v in self.instances
            if v.info.model == model
            and v.load is not None
            and v.load.timestamp >= current
            and v.load.status is InstanceStatus.ACTIVE
            and v.info.status is InstanceStatus.ACTIVE
            and v.info.instance_id not in exclude
        ]


class ClusterView:
    def __init__(
        self,
        store: StateStore,
        reservations: Reservations,
        *,
        refresh_interval_s: float,
        max_staleness_s: float,
        demand: DemandBoard | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[float], None] | None = None,
    ) -> None:
        """``on_refresh`` is called with the duration of every refresh attempt,
        whether it succeeded or not."""
        self._store = store
        self._on_refresh = on_refresh
        self._demand = demand
        self._reservations = reservations
        self._interval = refresh_interval_s
        self._max_staleness = max_staleness_s
        self._clock = clock
        self.snapshot = Snapshot()
        self._last_ok: float | None = None
        self._failures = 0

    async def refresh(self) -> None:
        views, reserved = await self._store.list_with_reservations(
            self._reservations.live_since_ms()
        )
        scalable = tuple(await self._demand.scalable()) if self._demand is not None else ()
        self.snapshot = Snapshot(tuple(views), reserved, self._clock(), scalable)
        self._last_ok = self._clock()
        if self._failures:
            log.info("Redis is back after %d failed refreshes", self._failures)
        self._failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = self._clock()
            try:
                await self.refresh()
            except Exception as exc:
                self._failures += 1
                if self._failures in (1, 20) or self._failures % 200 == 0:
                    log.warning(
                        "cluster view refresh failed (%d in a row): %s", self._failures, exc
                    )
            if self._on_refresh is not None:
                self._on_refresh(self._clock() - started)
            await asyncio.sleep(self._interval)

    @property
    def age_s(self) -> float:
        """Seconds since the last successful refresh (infinite before the first)."""
        return math.inf if self._last_ok is None else self._clock() - self._last_ok

    @property
    def fresh(self) -> bool:
        """The last refresh succeeded recently (the gateway is ready)."""
        return self.age_s < max(1.0, 10 * self._interval)

    @property
    def usable(self) -> bool:
        """The view is recent enough to dispatch from."""
        return self.age_s < self._max_staleness

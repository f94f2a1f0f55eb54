"""The control loop: snapshot -> policies -> decisions -> execution -> events.

Each tick the leader (see :mod:`autoscaler.leader`) builds a
:class:`Snapshot` from Redis and the provider, asks the scaling and pairing
policies for decisions and executes them: starting and stopping instances
through the provider, marking instances draining and migrating requests
through the instances' endpoints. Migrations run in the background, at most
one in or out of an instance at a time. A standby only renews nothing and
waits for the lease."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from autoscaler.decisions import Decision, Drain, Migrate, ScaleOut, Stop, describe
from autoscaler.instances import InstanceApi
from autoscaler.leader import LeaderLease
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policies import (
    PAIRING,
    SCALING,
    PairingConfig,
    ScalingConfig,
    ScalingState,
)
from autoscaler.providers import Provider
from autoscaler.snapshot import InstanceState, Snapshot
from infra.demand import DemandBoard
from infra.events import EventLog
from infra.records import InstanceStatus, InstanceView
from infra.store import StateStore
from migration.protocol import MigrateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    model: str
    """The served model name the provider's workers register with."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    scaling_policy: str | None = None
    """Registered name; None: the registry's default."""
    pairing_policy: str | None = None
    """Registered name; None: the registry's default."""
    tick_s: float = 0.5
    start_timeout_s: float = 600.0
    """A launched worker not registered after this long is stopped."""
    max_hold_s: float = 120.0
    """Held requests older than this are no longer demand (gateway gone)."""
    id_prefix: str = "inst"
    start_backoff_s: float = 10.0
    """After the provider fails to start an instance, wait this long to retry."""


class Controller:
    def __init__(
        self, *, config: ControllerConfig, store: StateStore, provider: Provider,
        instances: InstanceApi, lease: LeaderLease, events: EventLog, demand: DemandBoard,
        metrics: AutoscalerMetrics, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.config = config
        self._store, self._provider, self._instances = store, provider, instances
        self._lease, self._events, self._demand = lease, events, demand
        self._metrics, self._clock = metrics, clock
        self._scale = SCALING.get(config.scaling_policy)
        self._pair = PAIRING.get(config.pairing_policy)
        self.state = ScalingState()
        self._launched_at: dict[str, float] = {}
        self._stopping: set[str] = set()
        self._stopped: dict[str, float] = {}
        self._ready: set[str] = set()
        """Recently stopped instances, ignored while they shut down."""
        self._migrating: dict[str, asyncio.Task[None]] = {}
        self._views: dict[str, InstanceView] = {}
        self._leader = False
        self._last_tick: float | None = None
        self._start_backoff_until = -math.inf
        self.instance_seconds = 0.0

    @property
    def me(self) -> str:
        return self._lease.holder

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception:
                    log.exception("autoscaler tick failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.tick_s)
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for task in list(self._migrating.values()):
            task.cancel()
        await asyncio.gather(*self._migrating.values(), return_exceptions=True)
        if self._leader:
            await self._lease.release()
            self._leader = False
            self._metrics.leader.set(0)

    async def tick(self) -> list[Decision]:
        """One round; returns the decisions executed (none on a standby)."""
        if not await self._lease.acquire():
            if self._leader:
                log.warning("%s lost the lease", self.me)
                self._leader = False
            self._metrics.leader.set(0)
            return []
        if not self._leader:
            self._leader = True
            log.info("%s is the active autoscaler", self.me)
            await self._events.record("leader", self.me, reason="acquired the lease")
        self._metrics.leader.set(1)
        await self._demand.publish_scalable([self.config.model], ttl_s=10 * self.config.tick_s + 5)
        snap = await self.snapshot()
        self._account(snap)
        decisions, self.state = self._scale(snap, self.config.scaling, self.state)
        decisions = [*decisions, *self._pair(snap, self.config.pairing)]
        for decision in decisions:
            try:
                await self._execute(decision)
            except Exception as exc:
                log.exception("executing %s failed", decision)
                await self._events.record("error", self.me, decision=describe(decision),
                                          reason=f"{type(exc).__name__}: {exc}")  # fmt: skip
        await self._publish_state(snap)
        return decisions

    async def snapshot(self) -> Snapshot:
        now = self._clock()
        views = [v for v in await self._store.list_instances() if v.info.model == self.config.model]
        self._views = {v.info.instance_id: v for v in views}
        states = [
            InstanceState(
                v.info.instance_id,
                v.load.status if v.load else v.info.status,
                v.load,
                self._launched_at.get(v.info.instance_id, now),
            )
            for v in views
            if v.info.instance_id not in self._stopping and v.info.instance_id not in self._stopped
        ]
        self._stopped = {i: t for i, t in self._stopped.items() if now - t < 120.0}
        launched = set(self._provider.launched())
        for instance_id in sorted(
            launched - self._views.keys() - self._stopping - self._stopped.keys()
        ):
            started = self._launched_at.setdefault(instance_id, now)
            if now - started > self.config.start_timeout_s:
                await self._stop(instance_id, f"not ready after {now - started:.0f}s")
                continue
            states.append(InstanceState(instance_id, InstanceStatus.STARTING, None, started))
        await self._note_ready(states, now)
        held = await self._demand.num_held(self.config.max_hold_s)
        self._metrics.held.set(held)
        for state in InstanceStatus:
            self._metrics.instances.labels(state.value).set(
                sum(1 for s in states if s.status is state))  # fmt: skip
        return Snapshot(now, tuple(states), held, frozenset(self._migrating))

    async def _note_ready(self, states: list[InstanceState], now: float) -> None:
        """Record the cold start of instances launched here that now serve."""
        for state in states:
            if state.status is InstanceStatus.ACTIVE and state.instance_id not in self._ready:
                self._ready.add(state.instance_id)
                launched = self._launched_at.get(state.instance_id)
                if launched is not None:
                    self._metrics.cold_start.observe(now - launched)
                    await self._events.record("ready", self.me, instance_id=state.instance_id,
                                              cold_start_s=round(now - launched, 2))  # fmt: skip

    def _account(self, snap: Snapshot) -> None:
        """Instance-seconds: every instance that exists costs, starting or not."""
        if self._last_tick is not None:
            used = (snap.now - self._last_tick) * len(snap.instances)
            self.instance_seconds += used
            self._metrics.instance_seconds.inc(used)
        self._last_tick = snap.now

    async def _execute(self, decision: Decision) -> None:
        fields = describe(decision)
        kind = fields.pop("kind")
        self._metrics.decisions.labels(kind).inc()
        await self._events.record(kind, self.me, **fields,
                                  instance_seconds=round(self.instance_seconds, 1))  # fmt: skip
        log.info("decision: %s", decision)
        match decision:
            case ScaleOut(count=count):
                if self._clock() < self._start_backoff_until:
                    return
                for _ in range(count):
                    instance_id = f"{self.config.id_prefix}-{uuid.uuid4().hex[:6]}"
                    self._launched_at[instance_id] = self._clock()
                    try:
                        await self._provider.start(instance_id)
                        await self._events.record("started", self.me, instance_id=instance_id)
                    except Exception:
                        del self._launched_at[instance_id]
                        self._start_backoff_until = self._clock() + self.config.start_backoff_s
                        raise
            case Drain(instance_id=instance_id):
                await self._drain(instance_id)
            case Stop(instance_id=instance_id, reason=reason):
                await self._stop(instance_id, reason)
            case Migrate():
                self._start_migration(decision)

    async def _drain(self, instance_id: str) -> None:
        view = self._views.get(instance_id)
        if view is None:
            return
        try:
            await self._instances.set_status(view.info.address, InstanceStatus.DRAINING)
        except Exception as exc:
            await self._events.record("error", self.me, instance_id=instance_id,
                                      reason=f"could not mark draining: {exc}")  # fmt: skip

    async def _stop(self, instance_id: str, reason: str) -> None:
        self._stopping.add(instance_id)
        view = self._views.get(instance_id)
        try:
            await self._provider.stop(instance_id, view.info if view else None)
        finally:
            self._stopping.discard(instance_id)
            self._stopped[instance_id] = self._clock()
            self._ready.discard(instance_id)
            self._launched_at.pop(instance_id, None)
        if view is not None:  # a worker SIGKILLed meanwhile would linger until its TTL
            await self._store.deregister(instance_id)
        log.info("stopped %s: %s", instance_id, reason)

    def _start_migration(self, m: Migrate) -> None:
        src, dst = self._views.get(m.source), self._views.get(m.destination)
        if src is None or dst is None:
            return
        draining = src.load is not None and src.load.status is InstanceStatus.DRAINING
        body = MigrateRequest(destination=dst.info.address, count=m.count,
                              policy=m.selection, include_high=draining)  # fmt: skip
        task = asyncio.create_task(self._migrate(m, src.info.address, body))
        self._migrating[m.source] = self._migrating[m.destination] = task

    async def _migrate(self, m: Migrate, address: str, body: MigrateRequest) -> None:
        try:
            records = await self._instances.migrate(address, body)
            for r in records:
                self._metrics.migrations.labels(r.outcome.value).inc()
            await self._events.record(
                "migrated", self.me, source=m.source, destination=m.destination,
                outcomes=[r.outcome.value for r in records],
                downtime_ms=[None if r.downtime_s is None else round(r.downtime_s * 1000, 1)
                             for r in records],
            )  # fmt: skip
        except Exception as exc:
            await self._events.record("migration_failed", self.me, source=m.source,
                                      destination=m.destination, reason=str(exc))  # fmt: skip
        finally:
            for instance_id in (m.source, m.destination):
                if self._migrating.get(instance_id) is asyncio.current_task():
                    del self._migrating[instance_id]

    async def _publish_state(self, snap: Snapshot) -> None:
        state = {"leader": self.me, "timestamp": time.time(), "model": self.config.model,
                 "migrating": sorted(self._migrating), "num_held": snap.num_held,
                 "instance_seconds": round(self.instance_seconds, 1),
                 "scaling_policy": self.config.scaling_policy or SCALING.default,
                 "pairing_policy": self.config.pairing_policy or PAIRING.default}  # fmt: skip
        ttl_ms = int((5 * self.config.tick_s + 2) * 1000)
        await self._store.redis.set(self._store.keys.autoscaler, json.dumps(state), px=ttl_ms)

"""The control loop: snapshot -> policies -> decisions -> execution -> events.

Each tick the leader (see :mod:`autoscaler.leader`) builds a
:class:`Snapshot` from the registry and the provider, asks the policies for
decisions (:func:`autoscaler.policies.decide`: start timeouts, scaling,
pairing) and executes them: starting and stopping instances through the
provider, marking instances draining and migrating requests through the
instances' endpoints. Every decision and outcome is recorded as a typed
event. Migrations run in the background, at most one in or out of an
instance at a time. A standby renews nothing and waits for the lease.

Everything outside comes through small interfaces (:mod:`autoscaler.ports`,
the provider, the instances' API) and one clock, so the whole loop runs in a
test without processes or Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from autoscaler.decisions import (
    Decision,
    Drain,
    Migrate,
    ScaleOut,
    Stop,
    StopStarting,
    decision_event,
)
from autoscaler.instances import InstanceApi
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policies import (
    PAIRING,
    SCALING,
    PairingConfig,
    ScalingConfig,
    ScalingState,
    TickPolicies,
    decide,
    may_move_high,
)
from autoscaler.ports import Demand, Events, Lease, Registry, StateBoard, TrafficSource
from autoscaler.providers import Provider
from autoscaler.snapshot import InstanceState, Snapshot
from infra.events import (
    ErrorEvent,
    EventPayload,
    LeaderEvent,
    MigratedEvent,
    MigrationFailedEvent,
    ReadyEvent,
    StartedEvent,
)
from infra.records import AutoscalerState, InstanceStatus, InstanceView
from infra.traffic import Traffic
from migration.protocol import MigrateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    """The controller's knobs. ``autoscaler.main.controller_config`` fills
    them, and the policies' configs, from ``AutoscalerSettings`` by name."""

    model_name: str
    """The served model name the provider's workers register with."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """The scaling policy's knobs (the start timeout among them)."""
    pairing: PairingConfig = field(default_factory=PairingConfig)
    """The pairing policy's knobs."""
    scaling_policy: str | None = None
    """Registered name; None: the registry's default."""
    pairing_policy: str | None = None
    """Registered name; None: the registry's default."""
    tick_s: float = 0.5
    """Period of the control loop. The published state and the offered models
    expire a few periods after the last tick (5 ticks + 2 s, 10 ticks + 5 s)."""
    max_hold_s: float = 120.0
    """Held requests older than this are no longer demand (their gateway is
    gone); the gateways' own hold timeout (``SHOAL_HOLD_TIMEOUT_S``) is 120 s."""
    id_prefix: str = "inst"
    """Instances started here are named ``<id_prefix>-<6 hex digits>``."""
    start_backoff_s: float = 10.0
    """After the provider fails to start an instance, wait this long to retry."""
    stopped_grace_s: float = 120.0
    """A stopped instance is left out of snapshots for this long. It
    deregisters as it shuts down, but until then (or until its keys expire,
    after a SIGKILL) the registry and the provider may still list it, and it
    would count as live, or be stopped again."""


class Controller:
    def __init__(
        self, *, config: ControllerConfig, registry: Registry, provider: Provider,
        instances: InstanceApi, lease: Lease, events: Events, demand: Demand,
        board: StateBoard, metrics: AutoscalerMetrics, traffic: TrafficSource | None = None,
        clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.config = config
        self._registry, self._provider, self._instances = registry, provider, instances
        self._lease, self._events, self._demand, self._board = lease, events, demand, board
        self._metrics, self._clock, self._wall_clock = metrics, clock, wall_clock
        self._traffic = traffic
        self._policies = TickPolicies(
            SCALING.get(config.scaling_policy), config.scaling,
            PAIRING.get(config.pairing_policy), config.pairing,
        )  # fmt: skip
        self.state = ScalingState()
        self._launched_at: dict[str, float] = {}
        """Instances launched here (or first seen starting), by launch time."""
        self._stopping: set[str] = set()
        self._stopped: dict[str, float] = {}
        """Recently stopped instances, ignored while they shut down."""
        self._ready: set[str] = set()
        """Instances seen active (their cold start recorded)."""
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
        if not await self._hold_lease():
            return []
        ttl_s = 10 * self.config.tick_s + 5
        await self._demand.publish_scalable([self.config.model_name], ttl_s=ttl_s)
        snap = await self.snapshot()
        self._account(snap)
        decisions, self.state = decide(snap, self._policies, self.state)
        for decision in decisions:
            await self._execute(decision)
        await self._publish_state(snap)
        return decisions

    async def _hold_lease(self) -> bool:
        """Take or renew the lease; False (and a standby) while another holds it."""
        if not await self._lease.acquire():
            if self._leader:
                log.warning("%s lost the lease", self.me)
                self._leader = False
            self._metrics.leader.set(0)
            return False
        if not self._leader:
            self._leader = True
            log.info("%s is the active autoscaler", self.me)
            await self._record(LeaderEvent(reason="acquired the lease"))
        self._metrics.leader.set(1)
        return True

    # -- the snapshot ----------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        now = self._clock()
        views = await self._registry.list_instances()
        self._views = {
            v.info.instance_id: v for v in views if v.info.model == self.config.model_name
        }
        self._stopped = {
            i: t for i, t in self._stopped.items() if now - t < self.config.stopped_grace_s
        }
        states = [*self._registered(now), *self._starting(now)]
        await self._note_ready(states, now)
        held = await self._demand.num_held(self.config.max_hold_s)
        self._metrics.held.set(held)
        for status in InstanceStatus:
            self._metrics.instances.labels(status.value).set(
                sum(1 for s in states if s.status is status))  # fmt: skip
        traffic = await self._read_traffic()
        return Snapshot(now, tuple(states), held, frozenset(self._migrating), traffic)

    async def _read_traffic(self) -> Traffic | None:
        """The gateways' traffic, or None (no source, or Redis did not answer:
        the policy then sizes by the current load)."""
        if self._traffic is None:
            return None
        try:
            return await self._traffic.summary()
        except Exception as exc:
            log.debug("traffic unavailable this tick: %s", exc)
            return None

    def _gone(self, instance_id: str) -> bool:
        return instance_id in self._stopping or instance_id in self._stopped

    def _registered(self, now: float) -> list[InstanceState]:
        """Registered instances of the model, with their latest reports."""
        return [
            InstanceState(i, _status(v), v.load, self._launched_at.get(i, now))
            for i, v in self._views.items()
            if not self._gone(i)
        ]

    def _starting(self, now: float) -> list[InstanceState]:
        """Instances the provider launched that have not registered yet."""
        launched = set(self._provider.launched()) - self._views.keys()
        return [
            InstanceState(i, InstanceStatus.STARTING, None, self._launched_at.setdefault(i, now))
            for i in sorted(launched)
            if not self._gone(i)
        ]

    async def _note_ready(self, states: list[InstanceState], now: float) -> None:
        """Record the cold start of instances launched here that now serve."""
        for state in states:
            if state.status is InstanceStatus.ACTIVE and state.instance_id not in self._ready:
                self._ready.add(state.instance_id)
                launched = self._launched_at.get(state.instance_id)
                if launched is not None:
                    cold_start_s = round(now - launched, 2)
                    self._metrics.cold_start.observe(now - launched)
                    await self._record(ReadyEvent(instance_id=state.instance_id,
                                                  cold_start_s=cold_start_s))  # fmt: skip

    def _account(self, snap: Snapshot) -> None:
        """Instance-seconds: every instance that exists costs, starting or not."""
        if self._last_tick is not None:
            used = (snap.now - self._last_tick) * len(snap.instances)
            self.instance_seconds += used
            self._metrics.instance_seconds.inc(used)
        self._last_tick = snap.now

    # -- execution -------------------------------------------------------------
    async def _execute(self, decision: Decision) -> None:
        """Record the decision, carry it out; a failure becomes an ``error`` event."""
        event = decision_event(decision, self.instance_seconds)
        try:
            self._metrics.decisions.labels(decision.kind).inc()
            await self._record(event)
            log.info("decision: %s", decision)
            match decision:
                case ScaleOut(count=count):
                    await self._scale_out(count)
                case Drain(instance_id=instance_id):
                    await self._drain(instance_id)
                case Stop(instance_id=instance_id, reason=reason):
                    await self._stop(instance_id, reason)
                case StopStarting(instance_id=instance_id, reason=reason):
                    await self._stop(instance_id, reason)
                case Migrate():
                    self._start_migration(decision)
        except Exception as exc:
            log.exception("executing %s failed", decision)
            await self._record(ErrorEvent(reason=f"{type(exc).__name__}: {exc}", decision=event))

    async def _scale_out(self, count: int) -> None:
        """Launch ``count`` instances, unless a failed start backs off."""
        if self._clock() < self._start_backoff_until:
            return
        for _ in range(count):
            instance_id = f"{self.config.id_prefix}-{uuid.uuid4().hex[:6]}"
            self._launched_at[instance_id] = self._clock()
            try:
                await self._provider.start(instance_id)
            except Exception:
                del self._launched_at[instance_id]
                self._start_backoff_until = self._clock() + self.config.start_backoff_s
                raise
            await self._record(StartedEvent(instance_id=instance_id))

    async def _drain(self, instance_id: str) -> None:
        view = self._views.get(instance_id)
        if view is None:
            return
        try:
            await self._instances.set_status(view.info.address, InstanceStatus.DRAINING)
        except Exception as exc:
            await self._record(ErrorEvent(instance_id=instance_id,
                                          reason=f"could not mark draining: {exc}"))  # fmt: skip

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
            await self._registry.deregister(instance_id)
        log.info("stopped %s: %s", instance_id, reason)

    def _start_migration(self, m: Migrate) -> None:
        src, dst = self._views.get(m.source), self._views.get(m.destination)
        if src is None or dst is None:
            return
        body = MigrateRequest(destination=dst.info.address, count=m.count, policy=m.selection,
                              include_high=may_move_high(_status(src)))  # fmt: skip
        task = asyncio.create_task(self._migrate(m, src.info.address, body))
        self._migrating[m.source] = self._migrating[m.destination] = task

    async def _migrate(self, m: Migrate, address: str, body: MigrateRequest) -> None:
        try:
            records = await self._instances.migrate(address, body)
            for r in records:
                self._metrics.migrations.labels(r.outcome.value).inc()
            await self._record(MigratedEvent(
                source=m.source, destination=m.destination,
                outcomes=[r.outcome.value for r in records],
                downtime_ms=[None if r.downtime_s is None else round(r.downtime_s * 1000, 1)
                             for r in records],
            ))  # fmt: skip
        except Exception as exc:
            await self._record(MigrationFailedEvent(source=m.source, destination=m.destination,
                                                    reason=str(exc)))  # fmt: skip
        finally:
            for instance_id in (m.source, m.destination):
                if self._migrating.get(instance_id) is asyncio.current_task():
                    del self._migrating[instance_id]

    # -- what others see -------------------------------------------------------
    async def _record(self, payload: EventPayload) -> None:
        await self._events.record(self.me, payload)

    async def _publish_state(self, snap: Snapshot) -> None:
        state = AutoscalerState(
            leader=self.me, timestamp=self._wall_clock(), model=self.config.model_name,
            migrating=sorted(self._migrating), num_held=snap.num_held,
            instance_seconds=round(self.instance_seconds, 1),
            scaling_policy=self.config.scaling_policy or SCALING.default,
            pairing_policy=self.config.pairing_policy or PAIRING.default,
        )  # fmt: skip
        await self._board.publish(state, ttl_s=5 * self.config.tick_s + 2)


def _status(view: InstanceView) -> InstanceStatus:
    """An instance's state: its latest report's, else its registry entry's."""
    return view.load.status if view.load else view.info.status

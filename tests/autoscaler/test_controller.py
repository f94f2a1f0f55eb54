"""The controller in-process, with typed fakes of everything it talks to and
an injected clock: decisions are executed and recorded as typed events,
an instance that never becomes ready is stopped after the start timeout, a
failed start backs off, scale-out and scale-in go through the provider and
the instances' API, a drain moves requests by migration before the stop. No
processes, no Redis."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from prometheus_client import CollectorRegistry

from autoscaler.controller import Controller, ControllerConfig
from autoscaler.decisions import (
    Decision,
    Drain,
    Migrate,
    ScaleOut,
    Stop,
    StopStarting,
    decision_event,
)
from autoscaler.instances import InstanceCallFailed
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policies import PairingConfig, ScalingConfig
from infra.events import (
    DrainEvent,
    ErrorEvent,
    EventPayload,
    LeaderEvent,
    MigratedEvent,
    MigrateEvent,
    MigrationFailedEvent,
    ReadyEvent,
    ScaleOutEvent,
    StartedEvent,
    StartTimeoutEvent,
    StopEvent,
)
from infra.records import AutoscalerState, InstanceInfo, InstanceStatus, InstanceView
from migration.protocol import MigrateRequest, MigrationRecord, Outcome
from tests.autoscaler.snapshots import inst

MODEL = "m"
ME = "as-test"
P = TypeVar("P")


# -- the fakes -------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRegistry:
    def __init__(self) -> None:
        self.views: dict[str, InstanceView] = {}
        self.deregistered: list[str] = []

    def put(self, name: str, **load: object) -> InstanceView:
        """Register ``name`` with a report like ``snapshots.inst(name, **load)``'s."""
        report = inst(name, **load).load  # type: ignore[arg-type]
        assert report is not None
        info = InstanceInfo(
            instance_id=name, address=f"http://{name}", model=MODEL, engine="sim",
            status=report.status, pid=1, hostname="h", started_at=0.0, block_size=16,
            num_blocks_total=report.num_blocks_total, max_num_seqs=8, max_model_len=256,
        )  # fmt: skip
        self.views[name] = view = InstanceView(info=info, load=report)
        return view

    async def list_instances(self) -> list[InstanceView]:
        return [self.views[i] for i in sorted(self.views)]

    async def deregister(self, instance_id: str) -> None:
        self.deregistered.append(instance_id)
        self.views.pop(instance_id, None)


class FakeDemand:
    def __init__(self) -> None:
        self.held = 0
        self.scalable: list[str] = []

    async def num_held(self, max_age_s: float) -> int:
        return self.held

    async def publish_scalable(self, models: list[str], ttl_s: float) -> None:
        self.scalable = models


class FakeLease:
    def __init__(self, granted: bool = True) -> None:
        self.holder = ME
        self.granted = granted
        self.released = False

    async def acquire(self) -> bool:
        return self.granted

    async def release(self) -> None:
        self.released = True


class FakeEvents:
    def __init__(self) -> None:
        self.log: list[EventPayload] = []

    async def record(self, by: str, payload: EventPayload) -> None:
        assert by == ME
        self.log.append(payload)

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.log]

    def of(self, kind: type[P]) -> list[P]:
        return [p for p in self.log if isinstance(p, kind)]


class FakeBoard:
    def __init__(self) -> None:
        self.states: list[AutoscalerState] = []

    async def publish(self, state: AutoscalerState, ttl_s: float) -> None:
        self.states.append(state)


class FakeProvider:
    name = "fake"

    def __init__(self) -> None:
        self.running: list[str] = []
        self.attempts = 0
        self.failures = 0
        """Starts to refuse before the next one succeeds."""
        self.stopped: list[tuple[str, InstanceInfo | None]] = []

    async def start(self, instance_id: str) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise RuntimeError("no capacity")
        self.running.append(instance_id)

    async def stop(self, instance_id: str, info: InstanceInfo | None) -> None:
        self.stopped.append((instance_id, info))
        if instance_id in self.running:
            self.running.remove(instance_id)

    def launched(self) -> list[str]:
        return sorted(self.running)

    async def close(self) -> None: ...


class FakeInstances:
    def __init__(self) -> None:
        self.statuses: list[tuple[str, InstanceStatus]] = []
        self.migrations: list[tuple[str, MigrateRequest]] = []
        self.reply: list[MigrationRecord] | Exception = []
        self.gate = asyncio.Event()
        """A migration call returns once this is set."""
        self.gate.set()

    async def set_status(self, address: str, status: InstanceStatus) -> None:
        self.statuses.append((address, status))

    async def migrate(self, address: str, body: MigrateRequest) -> list[MigrationRecord]:
        self.migrations.append((address, body))
        await self.gate.wait()
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    async def close(self) -> None: ...


@dataclass
class Rig:
    """A controller and its fakes."""

    config: ControllerConfig
    clock: Clock = field(default_factory=Clock)
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    provider: FakeProvider = field(default_factory=FakeProvider)
    instances: FakeInstances = field(default_factory=FakeInstances)
    lease: FakeLease = field(default_factory=FakeLease)
    events: FakeEvents = field(default_factory=FakeEvents)
    demand: FakeDemand = field(default_factory=FakeDemand)
    board: FakeBoard = field(default_factory=FakeBoard)
    controller: Controller = field(init=False)

    def __post_init__(self) -> None:
        self.controller = Controller(
            config=self.config, registry=self.registry, provider=self.provider,
            instances=self.instances, lease=self.lease, events=self.events, demand=self.demand,
            board=self.board, metrics=AutoscalerMetrics(CollectorRegistry()), clock=self.clock,
            wall_clock=lambda: 1.7e9,
        )  # fmt: skip

    async def tick(self, after_s: float = 1.0) -> list[Decision]:
        self.clock.advance(after_s)
        decisions = await self.controller.tick()
        await settle()
        return decisions


def rig(*, pairing: PairingConfig | None = None, **scaling: object) -> Rig:
    cfg = ScalingConfig(**{"cooldown_s": 0.0, **scaling})  # type: ignore[arg-type]
    return Rig(ControllerConfig(MODEL, scaling=cfg, pairing=pairing or PairingConfig()))


async def settle() -> None:
    """Let background migrations run as far as they can."""
    for _ in range(20):
        await asyncio.sleep(0)


# -- decisions -> execution -> events ------------------------------------------------
async def test_a_tick_decides_executes_and_records_typed_events() -> None:
    r = rig(min_instances=1)
    decisions = await r.tick()
    assert [type(d) for d in decisions] == [ScaleOut]
    (new,) = r.provider.running
    assert new.startswith("inst-")
    assert r.events.log == [
        LeaderEvent(reason="acquired the lease"),
        ScaleOutEvent(count=1, reason=decisions[0].reason, instance_seconds=0.0),
        StartedEvent(instance_id=new),
    ]
    assert r.demand.scalable == [MODEL]
    assert r.board.states == [AutoscalerState(
        leader=ME, timestamp=1.7e9, model=MODEL, migrating=[], num_held=0,
        instance_seconds=0.0, scaling_policy="band", pairing_policy="llumnix",
    )]  # fmt: skip
    # Starting: counted (and paid for), nothing more decided.
    assert await r.tick(after_s=2.0) == []
    assert r.board.states[-1].instance_seconds == 2.0
    # It registers and reports active: its cold start is recorded once.
    r.registry.put(new)
    await r.tick(after_s=3.0)
    await r.tick()
    assert r.events.of(ReadyEvent) == [ReadyEvent(instance_id=new, cold_start_s=5.0)]
    assert r.events.kinds.count("leader") == 1


async def test_a_standby_decides_nothing() -> None:
    r = rig(min_instances=1)
    r.lease.granted = False
    assert await r.tick() == []
    assert r.events.log == [] and r.board.states == [] and r.provider.attempts == 0
    r.lease.granted = True
    await r.tick()
    assert r.events.kinds[:2] == ["leader", "scale_out"]
    await r.controller.shutdown()
    assert r.lease.released


def test_every_decision_has_its_event() -> None:
    decisions: list[Decision] = [
        ScaleOut(2, "r"), Drain("a", "r"), Stop("a", "r"), StopStarting("a", "r"),
        Migrate("a", "b", 3, "r", selection="lcfs"),
    ]  # fmt: skip
    for d in decisions:
        event = decision_event(d, 12.34)
        assert event.kind == d.kind and event.instance_seconds == 12.3
        assert event.model_dump(exclude={"kind", "instance_seconds"}) == asdict(d)


# -- the start timeout and the start back-off ----------------------------------------
async def test_an_instance_that_never_becomes_ready_is_stopped_after_the_start_timeout() -> None:
    r = rig(min_instances=1, start_timeout_s=30.0)
    await r.tick()
    (stuck,) = r.provider.running
    assert await r.tick(after_s=29.0) == []  # still within the timeout
    decisions = await r.tick(after_s=2.0)
    assert [type(d) for d in decisions] == [StopStarting, ScaleOut]  # replaced at once
    assert r.provider.stopped == [(stuck, None)]
    (timeout,) = r.events.of(StartTimeoutEvent)
    assert timeout.instance_id == stuck and "not ready after 31s" in timeout.reason
    assert r.events.kinds[-3:] == ["start_timeout", "scale_out", "started"]
    (replacement,) = r.provider.running
    assert replacement != stuck
    # Shutting down, it may still register: it stays out of the snapshot for
    # stopped_grace_s, and is not stopped again.
    r.registry.put(stuck)
    r.clock.advance(1.0)
    snap = await r.controller.snapshot()
    assert [i.instance_id for i in snap.instances] == [replacement]
    r.clock.advance(r.config.stopped_grace_s)
    snap = await r.controller.snapshot()
    assert {i.instance_id for i in snap.instances} == {replacement, stuck}


async def test_a_failed_start_backs_off_before_the_next_attempt() -> None:
    r = rig(min_instances=1)
    r.provider.failures = 1
    await r.tick()
    (error,) = r.events.of(ErrorEvent)
    assert error.reason == "RuntimeError: no capacity"
    assert isinstance(error.decision, ScaleOutEvent) and error.decision.count == 1
    assert r.provider.attempts == 1 and r.provider.running == []
    for _ in range(int(r.config.start_backoff_s) - 1):  # still decided, not attempted
        assert [type(d) for d in await r.tick()] == [ScaleOut]
    assert r.provider.attempts == 1
    await r.tick()
    assert r.provider.attempts == 2 and len(r.provider.running) == 1
    assert r.events.kinds[-1] == "started"


# -- scale in: drain, migrate, stop ------------------------------------------------
async def test_a_calm_drains_the_instance_cheapest_to_empty() -> None:
    r = rig(min_instances=1, scale_in_ticks=2)
    r.registry.put("a", running=1, used=10)
    r.registry.put("b", running=1, used=5)  # the lighter one
    assert await r.tick() == []
    decisions = await r.tick()
    assert decisions == [Drain("b", decisions[0].reason)]
    assert r.instances.statuses == [("http://b", InstanceStatus.DRAINING)]
    (drain,) = r.events.of(DrainEvent)
    assert drain.instance_id == "b" and "above 60" in drain.reason


async def test_a_draining_instance_migrates_its_requests_out_then_stops() -> None:
    r = rig(min_instances=1)
    drained = r.registry.put("d", running=2, used=20, status=InstanceStatus.DRAINING)
    r.registry.put("a")
    r.instances.gate.clear()  # the migration stays in flight
    decisions = await r.tick()
    assert decisions == [Migrate("d", "a", 4, "draining: 2 request(s) left")]
    ((address, body),) = r.instances.migrations
    assert address == "http://d"
    assert body == MigrateRequest(destination="http://a", count=4, include_high=True)
    assert r.board.states[-1].migrating == ["a", "d"]
    assert await r.tick() == []  # one migration per instance at a time
    r.instances.reply = [
        MigrationRecord(request_id="r1", source="http://d", destination="http://a", mode="kv",
                        outcome=Outcome.MIGRATED, downtime_s=0.0123),
        MigrationRecord(request_id="r2", source="http://d", destination="http://a", mode="kv",
                        outcome=Outcome.SOURCE_FINISHED),
    ]  # fmt: skip
    r.instances.gate.set()
    await settle()
    assert r.events.of(MigratedEvent) == [MigratedEvent(
        source="d", destination="a", outcomes=["migrated", "source_finished"],
        downtime_ms=[12.3, None],
    )]  # fmt: skip
    r.registry.put("d", status=InstanceStatus.DRAINING)  # empty now
    decisions = await r.tick()
    assert decisions == [Stop("d", "drained: no requests left")]
    assert r.provider.stopped == [("d", drained.info)]
    assert r.registry.deregistered == ["d"]
    assert [e.instance_id for e in r.events.of(StopEvent)] == ["d"]
    assert r.board.states[-1].migrating == []


async def test_a_failed_migration_is_recorded_and_frees_both_instances() -> None:
    r = rig(min_instances=1)
    r.registry.put("d", running=1, used=10, status=InstanceStatus.DRAINING)
    r.registry.put("a")
    r.instances.reply = InstanceCallFailed("http://d/migrate: 500 boom")
    await r.tick()
    assert r.events.of(MigrationFailedEvent) == [MigrationFailedEvent(
        source="d", destination="a", reason="http://d/migrate: 500 boom")]  # fmt: skip
    assert (await r.controller.snapshot()).migrating == frozenset()
    assert [type(d) for d in await r.tick()] == [Migrate]  # tried again


async def test_only_a_draining_source_gives_up_high_priority_requests() -> None:
    r = rig(min_instances=1)
    r.registry.put("vip", running=4, used=60, high=1)  # crowded around a high-priority one
    r.registry.put("other", running=1, used=10)
    (decision,) = await r.tick()
    assert isinstance(decision, Migrate) and decision.selection == "lowest-priority"
    ((_, body),) = r.instances.migrations
    assert body.include_high is False and body.policy == "lowest-priority"
    (event,) = r.events.of(MigrateEvent)
    assert (event.source, event.destination, event.count) == ("vip", "other", 1)

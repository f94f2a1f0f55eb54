"""The dispatcher with typed fakes and an injected clock, in process: ranking
through the registered policy, reservations (conflicts, a slow Redis), retries
before the first chunk, the scale-from-zero hold, and token replay after it.

The fake instances generate token ``100 + i`` with text ``t<i>,`` at output
position ``i`` and start a continuation where it says the client is, so a
gap, a repeat or a wrong continuation shows in the caller's sequence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.dispatcher import Dispatcher, HoldPolicy, RetryPolicy
from gateway.metrics import GatewayMetrics
from gateway.policies import make_policy
from gateway.upstream import UpstreamError, UpstreamRefused
from gateway.view import Snapshot
from infra.contract import ChunkBatch, GenerateChunk, GenerateRequest, Usage
from infra.errors import ErrorDetail, NotFoundError, ServiceUnavailableError
from infra.openai_protocol.render import StreamBroken
from infra.records import (
    InstanceInfo,
    InstanceStatus,
    InstanceView,
    LoadReport,
    PriorityCounts,
)

MODEL = "m"
MAX_TOKENS = 10


def token(i: int) -> int:
    return 100 + i


def text(i: int) -> str:
    return f"t{i},"


ALL_TOKENS = [token(i) for i in range(MAX_TOKENS)]
ALL_TEXT = "".join(text(i) for i in range(MAX_TOKENS))


def instance(iid: str, *, running: int = 0) -> InstanceView:
    info = InstanceInfo(
        instance_id=iid, address=f"http://{iid}", model=MODEL, engine="sim",
        status=InstanceStatus.ACTIVE, pid=1, hostname="h", started_at=0, block_size=16,
        num_blocks_total=100, max_num_seqs=8, max_model_len=1024,
    )  # fmt: skip
    load = LoadReport(
        instance_id=iid, seq=1, timestamp=50.0, status=InstanceStatus.ACTIVE,
        num_blocks_total=100, num_blocks_used=running, num_running=running, num_waiting=0,
        num_preempted_total=0, running_by_priority=PriorityCounts(),
        waiting_by_priority=PriorityCounts(), virtual_usage=float(running),
        freeness=100.0 / running if running else float("inf"),
    )  # fmt: skip
    return InstanceView(info=info, load=load)


def body(rid: str = "r") -> GenerateRequest:
    return GenerateRequest(request_id=rid, model=MODEL, prompt="hello", max_tokens=MAX_TOKENS,
                           stream=True, migratable=True)  # fmt: skip


# -- fakes ------------------------------------------------------------------


class FakeView:
    """A cluster view that is always usable unless told otherwise."""

    def __init__(self, *instances: InstanceView, scalable: tuple[str, ...] = ()) -> None:
        self.snapshot = Snapshot(instances, {}, 0.0, scalable)
        self.usable = True

    def add(self, view: InstanceView) -> None:
        """A new instance appears (at the next refresh)."""
        s = self.snapshot
        self.snapshot = Snapshot((*s.instances, view), dict(s.reserved), 0.0, s.scalable)


class FakeReservations:
    """Reservations as Redis would count them: this replica's plus ``others``
    (made by other replicas); ``hang`` or ``down`` make Redis slow or absent."""

    def __init__(self, others: dict[str, int] | None = None) -> None:
        self.others = others or {}
        self.held: dict[str, list[str]] = {}
        self.reserved: list[tuple[str, str]] = []
        self.released: list[tuple[str, str]] = []
        self.hang = False
        self.down = False
        self.gate: asyncio.Event | None = None
        """While set and not open, a reservation waits for it."""

    async def reserve(self, instance_id: str, request_id: str) -> int:
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise RedisConnectionError("Redis is down")
        self.reserved.append((instance_id, request_id))
        self.held.setdefault(instance_id, []).append(request_id)
        return len(self.held[instance_id]) + self.others.get(instance_id, 0)

    async def release(self, instance_id: str, request_id: str) -> None:
        self.released.append((instance_id, request_id))
        if request_id in self.held.get(instance_id, []):
            self.held[instance_id].remove(request_id)


How = Literal["drop", "error", "abort", "end", "migrate", "refuse"]


@dataclass(frozen=True)
class Script:
    """What an instance does with a request: serve it to the end, or stop
    after ``after`` more tokens in the way ``how`` says: ``drop`` (the
    connection is lost), ``error`` (an error chunk), ``abort`` (an abort
    chunk), ``end`` (the stream ends without a finish), ``migrate`` (the
    request moves to ``to``); ``refuse`` answers 400 at once."""

    after: int | None = None
    how: How = "drop"
    to: str = ""


SERVE = Script()


@dataclass
class Call:
    address: str
    request: GenerateRequest
    headers: dict[str, str]


@dataclass
class FakeInstances:
    """The instances' streams, each address following its scripts in turn
    (the last one again for every further request)."""

    scripts: dict[str, list[Script]] = field(default_factory=dict)
    refuse_resume: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    resumes: list[tuple[str, str]] = field(default_factory=list)
    resume_tokens: list[str | None] = field(default_factory=list)
    moved: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Request id -> (next output position, max tokens) of a migrated request."""
    served: dict[str, int] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    """Addresses whose stream was closed, in order."""

    def script(self, address: str) -> Script:
        n = self.served.get(address, 0)
        self.served[address] = n + 1
        scripts = self.scripts.get(address, [SERVE])
        return scripts[min(n, len(scripts) - 1)]

    async def stream(
        self, address: str, body: GenerateRequest, headers: dict[str, str]
    ) -> AsyncGenerator[ChunkBatch, None]:
        self.calls.append(Call(address, body, headers))
        assert body.request_id is not None and body.max_tokens is not None
        script = self.script(address)
        if script.how == "refuse":
            raise UpstreamRefused(400, ErrorDetail(message="no", type="invalid_request_error"))
        start = len(body.continuation.output_token_ids) if body.continuation else 0
        try:
            async for batch in self._run(address, body.request_id, start, body.max_tokens, script):
                yield batch
        finally:
            self.closed.append(address)

    async def resume(
        self, address: str, request_id: str, token: str | None
    ) -> AsyncGenerator[ChunkBatch, None]:
        self.resumes.append((address, request_id))
        self.resume_tokens.append(token)
        if address in self.refuse_resume:
            raise UpstreamError(f"{address} could not resume {request_id}: 404")
        start, total = self.moved.pop(request_id)
        async for batch in self._run(address, request_id, start, total, self.script(address)):
            yield batch

    async def _run(self, address: str, rid: str, start: int, total: int,
                   script: Script) -> AsyncGenerator[ChunkBatch, None]:  # fmt: skip
        end = total if script.after is None else min(total, start + script.after)
        chunks = [GenerateChunk(request_id=rid, token_ids=[token(i)], text=text(i))
                  for i in range(start, end)]  # fmt: skip
        if script.after is None:
            usage = Usage(prompt_tokens=2, completion_tokens=total, total_tokens=total + 2)
            chunks[-1] = chunks[-1].model_copy(update={"finish_reason": "length", "usage": usage})
        elif script.how == "error":
            error = ErrorDetail(message="the engine died", type="server_error")
            chunks.append(GenerateChunk(request_id=rid, error=error))
        elif script.how == "abort":
            chunks.append(GenerateChunk(request_id=rid, finish_reason="abort"))
        elif script.how == "migrate":
            chunks.append(GenerateChunk(request_id=rid, migrated_to=script.to))
            self.moved[rid] = (end, total)
        for i in range(0, len(chunks), 2):  # two chunks a batch
            await asyncio.sleep(0)
            yield chunks[i : i + 2]
        if script.after is not None and script.how == "drop":
            raise UpstreamError(f"{address}: connection lost")


class FakeDemand:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    async def hold(self, request_id: str) -> None:
        self.log.append(("hold", request_id))

    async def release(self, request_id: str) -> None:
        self.log.append(("release", request_id))


class FakeClock:
    """Time that passes only in ``sleep``; ``on_sleep(n)`` runs after the n-th
    sleep, and a ``gate`` makes a sleep wait until it is set."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[int], None] | None = None
        self.gate: asyncio.Event | None = None
        self.sleeping = asyncio.Event()
        """Set once something sleeps."""

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping.set()
        if self.gate is not None:
            await self.gate.wait()
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))
        await asyncio.sleep(0)


@dataclass
class Rig:
    """A dispatcher over fakes."""

    view: FakeView
    instances: FakeInstances = field(default_factory=FakeInstances)
    reservations: FakeReservations = field(default_factory=FakeReservations)
    demand: FakeDemand = field(default_factory=FakeDemand)
    clock: FakeClock = field(default_factory=FakeClock)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    policy: str = "least-load"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    hold: HoldPolicy = field(default_factory=HoldPolicy)
    reservation_timeout_s: float = 0.1

    def __post_init__(self) -> None:
        self.dispatcher = Dispatcher(
            self.view, make_policy(self.policy), self.reservations, self.instances,
            GatewayMetrics(self.registry), self.retry, hold=self.hold, demand=self.demand,
            reservation_timeout_s=self.reservation_timeout_s, clock=self.clock,
            sleep=self.clock.sleep,
        )  # fmt: skip

    async def run(self, request: GenerateRequest | None = None) -> list[ChunkBatch]:
        """The batches the caller gets, in order."""
        return [b async for b in self.dispatcher.generate(request or body(), MODEL)]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(f"shoal_gateway_{name}", labels) or 0.0

    @property
    def addresses(self) -> list[str]:
        return [c.address for c in self.instances.calls]


def flat(batches: list[ChunkBatch]) -> tuple[list[int], str]:
    chunks = [c for b in batches for c in b]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def whole(batches: list[ChunkBatch]) -> None:
    """The caller got every token once, in order, and the request's finish."""
    assert flat(batches) == (ALL_TOKENS, ALL_TEXT)
    assert batches[-1][-1].finish_reason == "length"


# -- ranking and reserving --------------------------------------------------


async def test_the_registered_policy_ranks_the_instances() -> None:
    rig = Rig(FakeView(instance("a", running=3), instance("b", running=1)))
    whole(await rig.run())
    assert rig.addresses == ["http://b"]  # least-load: the one with fewer running
    assert rig.reservations.reserved == [("b", "r")]
    assert rig.metric("dispatch_decisions_total", instance="b") == 1

    llumnix = Rig(FakeView(instance("a", running=1), instance("b", running=4)), policy="llumnix")
    await llumnix.run()
    assert llumnix.addresses == ["http://a"]  # the freest by virtual usage

    rotating = Rig(FakeView(instance("a"), instance("b")), policy="round-robin")
    for rid in ("r1", "r2", "r3"):
        await rotating.run(body(rid))
    assert rotating.addresses == ["http://b", "http://a", "http://b"]  # the tick advances


async def test_concurrent_dispatches_see_each_others_pending_reservations() -> None:
    rig = Rig(FakeView(instance("a"), instance("b")))
    rig.reservations.gate = asyncio.Event()  # Redis answers only once both asked
    first = asyncio.create_task(rig.run(body("r1")))
    second = asyncio.create_task(rig.run(body("r2")))
    for _ in range(5):
        await asyncio.sleep(0)
    rig.reservations.gate.set()
    await asyncio.gather(first, second)
    # r1 went to the idle a; r2 counted r1's reservation, still on its way, on a.
    assert sorted(rig.reservations.reserved) == [("a", "r1"), ("b", "r2")]


async def test_more_reservations_in_redis_than_known_ranks_again_and_moves() -> None:
    # Another replica reserved a twice meanwhile: a (1 running + 3) is now worse than b (2).
    reservations = FakeReservations(others={"a": 2})
    rig = Rig(FakeView(instance("a", running=1), instance("b", running=2)),
              reservations=reservations)  # fmt: skip
    whole(await rig.run())
    assert reservations.reserved == [("a", "r"), ("b", "r")]
    assert reservations.released == [("a", "r")]  # the first choice is given back
    assert rig.addresses == ["http://b"]
    assert rig.view.snapshot.reserved == {"a": 3, "b": 1}


async def test_more_reservations_than_known_but_still_the_best_keeps_it() -> None:
    reservations = FakeReservations(others={"a": 1})
    rig = Rig(FakeView(instance("a", running=1), instance("b", running=5)),
              reservations=reservations)  # fmt: skip
    await rig.run()
    assert reservations.reserved == [("a", "r")] and reservations.released == []
    assert rig.addresses == ["http://a"]


@pytest.mark.parametrize("redis", ["hang", "down"])
async def test_a_slow_or_absent_redis_dispatches_from_the_view(redis: str) -> None:
    rig = Rig(FakeView(instance("a", running=2), instance("b")), reservation_timeout_s=0.01)
    setattr(rig.reservations, redis, True)
    whole(await rig.run())
    assert rig.addresses == ["http://b"]  # the view's best, without a reservation
    assert rig.reservations.reserved == []
    assert rig.metric("reservations_skipped_total") == 1
    assert rig.metric("redis_call_seconds_count", call="reserve") == 1


async def test_unknown_model_and_an_unusable_view() -> None:
    rig = Rig(FakeView(instance("a")))
    chunks = rig.dispatcher.generate(body(), "other")
    with pytest.raises(NotFoundError) as err:
        await anext(chunks)
    assert err.value.param == "model"
    rig.view.usable = False
    with pytest.raises(ServiceUnavailableError):
        await rig.run()
    assert rig.instances.calls == []


# -- retries before the first chunk -----------------------------------------


async def test_a_failure_before_the_first_chunk_is_retried_on_another_instance() -> None:
    rig = Rig(FakeView(instance("a"), instance("b", running=1)))
    rig.instances.scripts["http://a"] = [Script(after=0, how="drop")]  # a stays the best
    whole(await rig.run())
    assert rig.addresses == ["http://a", "http://b"]  # a is not tried again
    assert [c.request.request_id for c in rig.instances.calls] == ["r", "r"]
    assert all(c.request.continuation is None for c in rig.instances.calls)
    assert rig.reservations.released == [("a", "r")]
    assert rig.clock.sleeps == [0.05]  # the backoff
    assert rig.metric("retries_total") == 1 and rig.metric("replays_total") == 0


async def test_retries_are_bounded_with_a_doubling_backoff() -> None:
    view = FakeView(instance("a"), instance("b", running=1), instance("c", running=2))
    rig = Rig(view)
    for iid in "abc":
        rig.instances.scripts[f"http://{iid}"] = [Script(after=0, how="end")]
    with pytest.raises(ServiceUnavailableError, match="after 3 attempts"):
        await rig.run()
    assert rig.addresses == ["http://a", "http://b", "http://c"]
    assert rig.clock.sleeps == [0.05, 0.1]
    assert sorted(rig.reservations.released) == [("a", "r"), ("b", "r"), ("c", "r")]
    assert rig.reservations.held == {"a": [], "b": [], "c": []}


async def test_a_refusal_is_the_clients_error_and_not_retried() -> None:
    rig = Rig(FakeView(instance("a"), instance("b", running=1)))
    rig.instances.scripts["http://a"] = [Script(how="refuse")]
    with pytest.raises(UpstreamRefused):
        await rig.run()
    assert rig.addresses == ["http://a"] and rig.reservations.released == [("a", "r")]


async def test_no_instance_left_to_retry_on_is_a_503() -> None:
    rig = Rig(FakeView(instance("a")))
    rig.instances.scripts["http://a"] = [Script(after=0, how="drop")]
    with pytest.raises(ServiceUnavailableError, match="no instance of 'm'") as err:
        await rig.run()
    assert err.value.headers == {"Retry-After": "2"}


# -- holding for an instance (scale from zero) -------------------------------


async def test_a_request_is_held_until_an_instance_appears() -> None:
    rig = Rig(FakeView(scalable=(MODEL,)))
    rig.clock.on_sleep = lambda n: rig.view.add(instance("a")) if n == 3 else None
    whole(await rig.run())
    assert rig.clock.sleeps == [0.1, 0.1, 0.1]  # polled until it appeared
    assert rig.addresses == ["http://a"]
    assert rig.demand.log == [("hold", "r"), ("release", "r")]
    assert rig.metric("held_requests") == 0 and rig.metric("hold_timeouts_total") == 0


async def test_a_hold_times_out_with_a_503_and_retry_after() -> None:
    rig = Rig(FakeView(scalable=(MODEL,)), hold=HoldPolicy(timeout_s=20.0, poll_s=5.0))
    with pytest.raises(ServiceUnavailableError, match="within 20s") as err:
        await rig.run()
    assert err.value.headers == {"Retry-After": "5"}
    assert rig.clock.sleeps == [5.0] * 4
    assert rig.metric("hold_timeouts_total") == 1 and rig.metric("held_requests") == 0
    assert rig.demand.log == [("hold", "r"), ("release", "r")]


async def test_the_hold_is_bounded() -> None:
    rig = Rig(FakeView(scalable=(MODEL,)), hold=HoldPolicy(max_held=1))
    rig.clock.gate = asyncio.Event()
    held = asyncio.create_task(rig.run(body("r1")))
    await rig.clock.sleeping.wait()
    assert rig.metric("held_requests") == 1
    with pytest.raises(ServiceUnavailableError, match="1 requests already wait") as err:
        await asyncio.wait_for(rig.run(body("r2")), 5)  # (held too, it would wait for the gate)
    assert err.value.headers == {"Retry-After": "30"}
    rig.view.add(instance("a"))
    rig.clock.gate.set()
    whole(await held)
    assert rig.demand.log == [("hold", "r1"), ("release", "r1")]


async def test_a_model_no_autoscaler_can_start_is_not_held() -> None:
    draining = instance("a")
    info = draining.info.model_copy(update={"status": InstanceStatus.DRAINING})
    rig = Rig(FakeView(draining.model_copy(update={"info": info})))
    with pytest.raises(ServiceUnavailableError, match="no instance of 'm'") as err:
        await rig.run()
    assert err.value.headers == {"Retry-After": "2"}
    assert rig.clock.sleeps == [] and rig.demand.log == []


# -- token replay after the first chunk -------------------------------------


async def test_an_instance_failing_mid_stream_is_replayed_from_what_was_sent() -> None:
    rig = Rig(FakeView(instance("a"), instance("b", running=1)))
    rig.instances.scripts["http://a"] = [Script(after=4, how="drop")]
    whole(await rig.run())  # no gap, no repeat
    assert rig.addresses == ["http://a", "http://b"]
    replay = rig.instances.calls[1].request
    assert replay.request_id == "r.r1"
    assert replay.continuation is not None
    assert replay.continuation.output_token_ids == ALL_TOKENS[:4]
    assert replay.continuation.emitted_chars == len("t0,t1,t2,t3,")
    assert replay.prompt == "hello" and replay.max_tokens == MAX_TOKENS
    assert rig.reservations.reserved == [("a", "r"), ("b", "r.r1")]
    assert rig.reservations.released == []  # both attempts reached the client
    assert rig.clock.sleeps == []  # a replay does not back off
    assert rig.metric("replays_total") == 1 and rig.metric("retries_total") == 0


@pytest.mark.parametrize("how", ["error", "abort", "end"])
async def test_an_error_an_abort_or_an_unfinished_end_is_replayed(how: How) -> None:
    rig = Rig(FakeView(instance("a"), instance("b", running=1)))
    rig.instances.scripts["http://a"] = [Script(after=3, how=how)]  # mid-batch for error, abort
    batches = await rig.run()
    whole(batches)
    assert not any(c.error or c.finish_reason == "abort" for b in batches for c in b)
    replay = rig.instances.calls[1].request
    assert replay.continuation is not None
    assert replay.continuation.output_token_ids == ALL_TOKENS[:3]
    assert replay.continuation.emitted_chars == len("t0,t1,t2,")


async def test_a_migration_is_followed() -> None:
    rig = Rig(FakeView(instance("a"), instance("c", running=1)))
    rig.instances.scripts["http://a"] = [Script(after=4, how="migrate", to="http://c")]
    batches = await rig.run()
    whole(batches)
    assert not any(c.migrated_to for b in batches for c in b)
    assert rig.addresses == ["http://a"] and rig.instances.resumes == [("http://c", "r")]
    assert rig.metric("migrations_followed_total") == 1 and rig.metric("replays_total") == 0
    # Only this gateway can follow it: the resume presents the token it dispatched with.
    token = rig.instances.calls[0].request.resume_token
    assert token and len(token) >= 16 and rig.instances.resume_tokens == [token]


async def test_a_refused_resume_after_a_migration_is_replayed() -> None:
    rig = Rig(FakeView(instance("a"), instance("c", running=1)))
    rig.instances.scripts["http://a"] = [Script(after=4, how="migrate", to="http://c"), SERVE]
    rig.instances.refuse_resume.add("http://c")
    whole(await rig.run())
    assert rig.instances.resumes == [("http://c", "r")]
    # c refused: it is left out, and the request goes on (on a) from what was sent.
    assert rig.addresses == ["http://a", "http://a"]
    replay = rig.instances.calls[1].request
    assert replay.request_id == "r.r1" and replay.continuation is not None
    assert replay.continuation.output_token_ids == ALL_TOKENS[:4]
    assert replay.resume_token == rig.instances.calls[0].request.resume_token  # same owner
    assert rig.metric("replays_total") == 1


async def test_a_replay_failing_before_its_first_chunk_is_replayed_again() -> None:
    rig = Rig(FakeView(instance("a"), instance("b", running=1), instance("c", running=2)))
    rig.instances.scripts["http://a"] = [Script(after=2, how="drop")]
    rig.instances.scripts["http://b"] = [Script(after=0, how="drop")]
    whole(await rig.run())
    assert rig.addresses == ["http://a", "http://b", "http://c"]
    ids = [c.request.request_id for c in rig.instances.calls]
    assert ids == ["r", "r.r1", "r.r2"]
    assert rig.reservations.released == [("b", "r.r1")]  # under the id it was made with
    cont = rig.instances.calls[2].request.continuation
    assert cont is not None and cont.output_token_ids == ALL_TOKENS[:2]
    assert rig.clock.sleeps == [] and rig.metric("replays_total") == 2


async def test_replays_are_bounded() -> None:
    view = FakeView(*(instance(i, running=n) for n, i in enumerate("abcd")))
    rig = Rig(view, retry=RetryPolicy(max_replays=2))
    for iid in "abcd":
        rig.instances.scripts[f"http://{iid}"] = [Script(after=2, how="drop")]
    got: list[ChunkBatch] = []
    with pytest.raises(StreamBroken, match="connection lost"):
        async for batch in rig.dispatcher.generate(body(), MODEL):
            got.append(batch)
    assert rig.addresses == ["http://a", "http://b", "http://c"]
    assert flat(got) == (ALL_TOKENS[:6], "t0,t1,t2,t3,t4,t5,")  # still no gap or repeat
    assert rig.metric("replays_total") == 2


async def test_no_instance_to_continue_on_breaks_the_stream() -> None:
    rig = Rig(FakeView(instance("a")))
    rig.instances.scripts["http://a"] = [Script(after=2, how="drop")]
    with pytest.raises(StreamBroken, match="no instance to continue on"):
        await rig.run()


async def test_a_refused_replay_breaks_the_stream() -> None:
    rig = Rig(FakeView(instance("a"), instance("b", running=1)))
    rig.instances.scripts["http://a"] = [Script(after=2, how="drop")]
    rig.instances.scripts["http://b"] = [Script(how="refuse")]
    with pytest.raises(StreamBroken, match="the replay was refused"):
        await rig.run()
    assert rig.reservations.released == [("b", "r.r1")]


async def test_closing_the_stream_early_closes_the_instance_stream_at_once() -> None:
    rig = Rig(FakeView(instance("a")))
    chunks = rig.dispatcher.generate(body(), MODEL)
    first = await anext(chunks)
    assert first[0].token_ids == [token(0)]
    await chunks.aclose()  # the client went away
    assert rig.instances.closed == ["http://a"]  # not later, when collected
    assert rig.reservations.released == []

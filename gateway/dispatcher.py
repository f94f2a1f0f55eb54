"""Dispatch mechanism: snapshot -> policy -> reservation -> upstream stream,
with retries on other instances while nothing has reached the client, and
replays from the tokens already sent once something has.

The dispatcher's collaborators are the interfaces below (the cluster view,
the reservations, the instances' streams, the demand board); its clock and
sleep are injected, so it runs in tests without processes, Redis or waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.policies import Candidate, DispatchContext, DispatchPolicy, DispatchRequest
from gateway.upstream import UpstreamError, UpstreamRefused
from gateway.view import Snapshot
from infra.contract import ChunkBatch, Continuation, GenerateChunk, GenerateRequest
from infra.errors import NotFoundError, ServiceUnavailableError, ShoalError
from infra.openai_protocol.render import StreamBroken
from infra.telemetry import inject_context

log = logging.getLogger(__name__)


class View(Protocol):
    """The cluster as this replica sees it (``gateway.view.ClusterView``)."""

    @property
    def usable(self) -> bool:
        """The view is recent enough to dispatch from."""

    @property
    def snapshot(self) -> Snapshot:
        """The latest instances, their loads and reservation counts."""


class ReservationBook(Protocol):
    """The reservations in Redis (``gateway.reservations.Reservations``)."""

    async def reserve(self, instance_id: str, request_id: str) -> int:
        """Reserve a slot; the instance's count of reservations its reports do
        not count yet, this one included."""

    async def release(self, instance_id: str, request_id: str) -> None:
        """Give a reservation back."""


class Upstream(Protocol):
    """The instances' chunk streams (``gateway.upstream.InstanceClient``)."""

    def stream(
        self, address: str, body: GenerateRequest, headers: dict[str, str]
    ) -> AsyncGenerator[ChunkBatch, None]:
        """The chunks of ``body`` run at ``address``; raises ``UpstreamError``
        (the instance failed) or ``UpstreamRefused`` (it refused the request)."""

    def resume(
        self, address: str, request_id: str, token: str | None
    ) -> AsyncGenerator[ChunkBatch, None]:
        """The chunks of a request that migrated to ``address``, from where it
        resumed; ``token``: the request's resume token."""


class Demand(Protocol):
    """Requests held for want of an instance, for the autoscaler (``infra.demand.DemandBoard``)."""

    async def hold(self, request_id: str) -> None: ...

    async def release(self, request_id: str) -> None: ...


Clock = Callable[[], float]
"""Seconds on a monotonic clock (``time.monotonic``)."""
Sleep = Callable[[float], Awaitable[None]]
"""Waits this many seconds (``asyncio.sleep``)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often a request is tried again, before and after its first token."""

    max_attempts: int = 3
    """Instances tried before anything reached the client; then 503."""
    backoff_s: float = 0.05
    """Wait before the first retry; it doubles before each further one."""
    max_replays: int = 3
    """Times a stream that broke after its first token is taken up again elsewhere."""

    def backoff(self, failures: int) -> float:
        """The wait before the retry that follows failure number ``failures``."""
        return self.backoff_s * 2.0 ** (failures - 1)


@dataclass(frozen=True)
class HoldPolicy:
    """Requests that find no instance of a model an autoscaler can start wait
    for one (scale from zero): at most ``max_held`` per gateway, each at most
    ``timeout_s``; beyond that, 503 with ``Retry-After``."""

    max_held: int = 256
    """Requests one gateway replica holds at once; one more is answered 503 at
    once (0: nothing is held)."""
    timeout_s: float = 120.0
    """Longest a request is held; then it is answered 503."""
    poll_s: float = 0.1
    """How often a held request looks in the cluster view for an instance."""

    @property
    def retry_after_s(self) -> int:
        """``Retry-After`` of a 503 for a full hold or a hold that timed out."""
        return max(1, int(self.timeout_s / 4))


MAX_RESERVE_CONFLICTS = 8
"""Times one dispatch ranks again after Redis showed more reservations than
it knew of; after that it keeps its last choice."""


class _Broken(Exception):
    """An attempt failed: the instance at ``address`` broke the stream."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(reason)
        self.address = address


@dataclass
class _Sent:
    """What the client has of the request so far: a replay starts after it."""

    token_ids: list[int]
    chars: int = 0
    batches: int = 0

    def note(self, batch: ChunkBatch) -> None:
        for chunk in batch:
            self.token_ids.extend(chunk.token_ids)
            self.chars += len(chunk.text)
        self.batches += 1

    def replay_of(self, body: GenerateRequest, replay: int) -> GenerateRequest:
        """``body`` continued after what was sent, under an id of its own (the
        broken instance, or a migration destination, may still know the old one)."""
        if not self.token_ids:
            return body.model_copy(update={"request_id": f"{body.request_id}.r{replay}"})
        cont = Continuation(output_token_ids=list(self.token_ids), emitted_chars=self.chars)
        return body.model_copy(
            update={"request_id": f"{body.request_id}.r{replay}", "continuation": cont}
        )


@dataclass
class _Progress:
    """One call through its attempts: what reached the client, the instances
    that failed it, and its retries and replays so far."""

    body: GenerateRequest
    """The request as the caller made it."""
    request: GenerateRequest
    """What the next attempt sends: ``body``, or a replay of it."""
    sent: _Sent = field(default_factory=lambda: _Sent([]))
    exclude: set[str] = field(default_factory=set)
    """Instances that failed this call: not tried again."""
    failures: int = 0
    """Attempts that failed before anything reached the client."""
    replays: int = 0
    """Attempts that took the stream up again after its first token."""

    @property
    def attempt(self) -> int:
        return self.failures + self.replays + 1


def _failure(chunk: GenerateChunk) -> str | None:
    """Why ``chunk`` ends its stream without the request being done, if it does.
    An ``abort`` the client did not ask for (the instance stopped, or an
    operator aborted it there) is such an end too: the request goes on elsewhere."""
    if chunk.error is not None:
        return chunk.error.message
    if chunk.finish_reason == "abort":
        return "the instance aborted the request"
    return None


def _prompt_estimate(body: GenerateRequest) -> int:
    """Rough prompt length in tokens (the gateway does not tokenise)."""
    if isinstance(body.prompt, list):
        return max(1, len(body.prompt))
    if isinstance(body.prompt, str):
        return max(1, len(body.prompt) // 4)
    return max(1, sum(len(m.text()) for m in body.messages or []) // 4)


class Dispatcher:
    def __init__(
        self,
        view: View,
        policy: DispatchPolicy,
        reservations: ReservationBook,
        upstream: Upstream,
        metrics: GatewayMetrics,
        retry: RetryPolicy,
        tracer: trace.Tracer | None = None,
        *,
        hold: HoldPolicy | None = None,
        demand: Demand | None = None,
        reservation_timeout_s: float = 0.1,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``clock`` times the holds; ``sleep`` waits out backoffs and hold polls."""
        self._tracer = tracer or trace.NoOpTracer()
        self._view = view
        self._policy = policy
        self._reservations = reservations
        self._upstream = upstream
        self._metrics = metrics
        self._retry = retry
        self._tick = 0
        self._rng = random.Random()
        self._pending: dict[str, int] = {}
        self._hold = hold or HoldPolicy()
        self._demand = demand
        self._num_held = 0
        self._reservation_timeout_s = reservation_timeout_s
        self._clock = clock
        self._sleep = sleep

    # -- the stream of one call ---------------------------------------------

    async def generate(
        self, body: GenerateRequest, model: str, parent: Context | None = None
    ) -> AsyncGenerator[ChunkBatch, None]:
        """Stream the request's chunks (in batches) from the best instance,
        following it when it migrates. An attempt that fails before anything
        reached the client is retried on another instance; one that fails
        after is *replayed* on another instance from the tokens the client
        already has (the recompute path of migration), so the stream goes on
        with nothing lost or repeated. Raises :class:`StreamBroken` once the
        replays are used up. Each attempt is traced as a ``gateway.dispatch``
        span and a ``gateway.proxy`` span whose context travels to the instance."""
        assert body.request_id is not None
        if body.migratable and body.resume_token is None:  # only this gateway may follow it
            body = body.model_copy(update={"resume_token": secrets.token_urlsafe(24)})
        run = _Progress(body, body)
        while True:
            chosen = await self._dispatch(run, model, parent)
            try:
                async with aclosing(self._attempt(run, chosen, parent)) as batches:
                    async for batch in batches:
                        yield batch
                return
            except _Broken as exc:
                await self._recover(run, chosen, exc)

    async def _dispatch(self, run: _Progress, model: str, parent: Context | None) -> Candidate:
        """Choose (and reserve) the instance of the next attempt. With nothing
        to choose from after the first token, the stream is broken."""
        try:
            with self._tracer.start_as_current_span("gateway.dispatch", context=parent) as sp:
                chosen = await self._choose(run.request, model, run.exclude)
                sp.set_attribute("shoal.instance_id", chosen.instance_id)
                sp.set_attribute("shoal.attempt", run.attempt)
        except ShoalError as exc:
            if run.sent.batches:
                raise StreamBroken(f"no instance to continue on: {exc.message}") from exc
            raise
        self._metrics.dispatched.labels(chosen.instance_id).inc()
        return chosen

    async def _attempt(
        self, run: _Progress, chosen: Candidate, parent: Context | None
    ) -> AsyncGenerator[ChunkBatch, None]:
        """``run.request``'s batches from ``chosen`` (and wherever it migrates),
        noted as sent. An attempt that sent nothing gives its reservation back;
        a refused replay ends the stream."""
        request, before = run.request, run.sent.batches
        proxy = self._tracer.start_span("gateway.proxy", context=parent)
        proxy.set_attribute("shoal.instance_id", chosen.instance_id)
        headers = inject_context({}, trace.set_span_in_context(proxy))
        try:
            async with aclosing(self._follow(chosen.info.address, request, headers)) as batches:
                async for batch in batches:
                    run.sent.note(batch)
                    yield batch
        except UpstreamRefused as exc:
            if run.sent.batches:  # the continuation was refused: nothing more to try
                raise StreamBroken(f"the replay was refused: {exc}") from exc
            raise
        finally:
            proxy.end()
            if run.sent.batches == before:  # a failed attempt must not keep counting
                rid = request.request_id or ""
                await _quietly(self._reservations.release(chosen.instance_id, rid))

    async def _recover(self, run: _Progress, chosen: Candidate, exc: _Broken) -> None:
        """After a broken attempt: leave out the instance that broke it, then
        retry after a backoff if the client has nothing yet, or replay from
        what it has. Raises once the retries or the replays are used up."""
        run.exclude.add(self._instance_at(exc.address) or chosen.instance_id)
        if run.sent.batches:
            self._replay(run, exc)
        else:
            await self._back_off(run, exc)

    async def _back_off(self, run: _Progress, exc: _Broken) -> None:
        run.failures += 1
        self._metrics.retries.inc()
        log.warning("attempt %d of %s failed on %s: %s", run.failures, run.body.request_id,
                    exc.address, exc)  # fmt: skip
        if run.failures >= self._retry.max_attempts:
            raise ServiceUnavailableError(
                f"no instance could serve the request after {run.failures} attempts"
            ) from exc
        await self._sleep(self._retry.backoff(run.failures))

    def _replay(self, run: _Progress, exc: _Broken) -> None:
        run.replays += 1
        if run.replays > self._retry.max_replays:
            raise StreamBroken(str(exc)) from exc
        self._metrics.replays.inc()
        log.warning("%s broke on %s after %d tokens (%s): replaying it elsewhere",
                    run.body.request_id, exc.address, len(run.sent.token_ids), exc)  # fmt: skip
        run.request = run.sent.replay_of(run.body, run.replays)

    async def _follow(
        self, address: str, request: GenerateRequest, headers: dict[str, str]
    ) -> AsyncGenerator[ChunkBatch, None]:
        """The request's chunks from ``address`` and from wherever it migrates,
        up to its last chunk. Raises :class:`_Broken` (naming the instance that
        failed) when a stream fails, is refused, or ends before the request."""
        assert request.request_id is not None
        stream = self._upstream.stream(address, request, headers)
        while True:
            moved_to: str | None = None
            finished = False
            try:
                async for batch in stream:
                    moved_to, batch = _split_migrated(batch)
                    good, failure = _until_failure(batch)
                    if good:
                        yield good
                    if failure is not None:
                        raise _Broken(address, failure)
                    finished = finished or any(c.finish_reason for c in good)
            except UpstreamError as exc:
                raise _Broken(address, str(exc)) from exc
            finally:
                await stream.aclose()
            if moved_to is None:
                if not finished:
                    raise _Broken(address, "the stream ended before the request finished")
                return
            self._metrics.migrations_followed.inc()
            address = moved_to
            stream = self._upstream.resume(moved_to, request.request_id, request.resume_token)

    def _instance_at(self, address: str) -> str | None:
        return next((v.info.instance_id for v in self._view.snapshot.instances
                     if v.info.address == address), None)  # fmt: skip

    # -- choosing an instance -------------------------------------------------

    async def _choose(self, body: GenerateRequest, model: str, exclude: set[str]) -> Candidate:
        """Rank with the policy and reserve the best instance in Redis.

        Reservations of this replica still on their way to Redis count as
        pending, so concurrent requests here see each other at once. If Redis
        shows more reservations than this replica knew of (another replica
        chose the same instance meanwhile), rank again with the fresh count and
        move if another instance is now better."""
        assert body.request_id is not None
        request = DispatchRequest(priority=body.priority, num_prompt_tokens=_prompt_estimate(body))
        self._tick += 1
        best: Candidate | None = None
        for _ in range(MAX_RESERVE_CONFLICTS):
            ranked = await self._best(request, model, exclude, body.request_id)
            if best is not None:
                if ranked.instance_id == best.instance_id:
                    return best  # still the best with the fresh count: keep it
                await _quietly(self._reservations.release(best.instance_id, body.request_id))
            best = ranked
            count = await self._reserve(best, body.request_id)
            if count is None or count <= best.num_reserved + 1:
                return best  # no reservation, or none this replica did not know of
        assert best is not None
        return best

    async def _best(
        self, request: DispatchRequest, model: str, exclude: set[str], request_id: str
    ) -> Candidate:
        """The policy's first choice, once there is an instance to choose."""
        candidates = self._candidates(model, exclude)
        if not candidates:
            candidates = await self._wait_for_instance(model, exclude, request_id)
        return self._policy.rank(DispatchContext(request, candidates, self._tick, self._rng))[0]

    def any_instance(self, model: str) -> str:
        """The address of a ready instance of ``model``, for a call that needs
        no load balancing (``/tokenize``): 404 for a model nobody serves, 503
        (with ``Retry-After``) while none is ready."""
        candidates = self._candidates(model, set())
        if not candidates:
            raise ServiceUnavailableError(f"no instance of {model!r} is available",
                                          retry_after_s=2)  # fmt: skip
        return self._rng.choice(candidates).info.address

    def _candidates(self, model: str, exclude: set[str]) -> list[Candidate]:
        if not self._view.usable:
            raise ServiceUnavailableError("the gateway has no recent view of the cluster")
        snapshot = self._view.snapshot
        if model not in snapshot.models():  # (includes models an autoscaler can start)
            raise NotFoundError(
                f"model {model!r} does not exist; available: {snapshot.models()}",
                param="model", code="model_not_found",
            )  # fmt: skip
        return snapshot.candidates(model, exclude, self._pending)

    async def _reserve(self, c: Candidate, request_id: str) -> int | None:
        """Reserve a slot on ``c`` in Redis: the count of its reservations not
        yet in its report, this one included. None when Redis is down or too
        slow: the request goes out on the last view rather than wait (the
        reservation only refines the view)."""
        self._pending[c.instance_id] = self._pending.get(c.instance_id, 0) + 1
        started = time.perf_counter()
        try:
            count = await asyncio.wait_for(
                self._reservations.reserve(c.instance_id, request_id),
                self._reservation_timeout_s,
            )
        except (RedisError, TimeoutError) as exc:
            log.warning("reservation skipped for %s: %r", request_id, exc)
            self._metrics.reservations_skipped.inc()
            return None
        finally:
            self._pending[c.instance_id] -= 1
            self._metrics.redis_call.labels("reserve").observe(time.perf_counter() - started)
        self._view.snapshot.note_reserved(c.instance_id, count)
        return count

    # -- holding for an instance (scale from zero) ----------------------------

    async def _wait_for_instance(
        self, model: str, exclude: set[str], request_id: str
    ) -> list[Candidate]:
        """Hold the request until an instance of ``model`` is ready, recording
        the demand in Redis for the autoscaler (scale from zero)."""
        self._check_may_hold(model, exclude)
        self._num_held += 1
        self._metrics.held.inc()
        try:
            if self._demand is not None:
                await _quietly(self._demand.hold(request_id))
            return await self._poll_for_instance(model, exclude)
        finally:
            self._num_held -= 1
            self._metrics.held.dec()
            if self._demand is not None:
                await _quietly(self._demand.release(request_id))

    def _check_may_hold(self, model: str, exclude: set[str]) -> None:
        """503 at once for a request that may not wait: it already failed on an
        instance, no autoscaler can start its model, or the hold is full."""
        if exclude or model not in self._view.snapshot.scalable:
            raise ServiceUnavailableError(f"no instance of {model!r} is available",
                                          retry_after_s=2)  # fmt: skip
        if self._num_held >= self._hold.max_held:
            raise ServiceUnavailableError(
                f"{self._num_held} requests already wait for an instance of {model!r}",
                retry_after_s=self._hold.retry_after_s,
            )

    async def _poll_for_instance(self, model: str, exclude: set[str]) -> list[Candidate]:
        hold = self._hold
        deadline = self._clock() + hold.timeout_s
        while self._clock() < deadline:
            await self._sleep(hold.poll_s)
            candidates = self._candidates(model, exclude)
            if candidates:
                return candidates
        self._metrics.hold_timeouts.inc()
        raise ServiceUnavailableError(
            f"no instance of {model!r} became ready within {hold.timeout_s:g}s",
            retry_after_s=hold.retry_after_s,
        )


def _until_failure(batch: ChunkBatch) -> tuple[ChunkBatch, str | None]:
    """The chunks of ``batch`` before one that breaks the stream, and why it does."""
    for i, chunk in enumerate(batch):
        failure = _failure(chunk)
        if failure is not None:
            return batch[:i], failure
    return batch, None


def _split_migrated(batch: ChunkBatch) -> tuple[str | None, ChunkBatch]:
    """Where the request moved (if it did) and the chunks to pass on."""
    moved = next((c.migrated_to for c in batch if c.migrated_to), None)
    return moved, [c for c in batch if not c.migrated_to]


async def _quietly(coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except Exception as exc:
        log.debug("ignored: %s", exc)

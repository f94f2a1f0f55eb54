"""Dispatch mechanism: snapshot -> policy -> reservation -> upstream stream,
with retries on other instances while nothing has reached the client."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.policies import Candidate, DispatchContext, DispatchPolicy, DispatchRequest
from gateway.reservations import Reservations
from gateway.upstream import InstanceClient, UpstreamError, UpstreamRefused
from gateway.view import ClusterView
from infra.contract import ChunkBatch, Continuation, GenerateChunk, GenerateRequest
from infra.demand import DemandBoard
from infra.errors import NotFoundError, ServiceUnavailableError, ShoalError
from infra.openai_protocol.render import StreamBroken
from infra.records import Priority
from infra.telemetry import inject_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    """Instances tried before anything reached the client."""
    backoff_s: float = 0.05
    max_replays: int = 3
    """Times a stream that broke after its first token is taken up again elsewhere."""


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


def _failure(chunk: GenerateChunk) -> str | None:
    """Why ``chunk`` ends its stream without the request being done, if it does.
    An ``abort`` the client did not ask for (the instance stopped, or an
    operator aborted it there) is such an end too: the request goes on elsewhere."""
    if chunk.error is not None:
        return chunk.error.message
    if chunk.finish_reason == "abort":
        return "the instance aborted the request"
    return None


@dataclass(frozen=True)
class HoldPolicy:
    """Requests that find no instance of a model an autoscaler can start wait
    for one (scale from zero): at most ``max_held`` per gateway, each at most
    ``timeout_s``; beyond that, 503 with ``Retry-After``."""

    max_held: int = 256
    timeout_s: float = 120.0
    poll_s: float = 0.1


MAX_RESERVE_CONFLICTS = 8


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
        view: ClusterView,
        policy: DispatchPolicy,
        reservations: Reservations,
        upstream: InstanceClient,
        metrics: GatewayMetrics,
        retry: RetryPolicy,
        tracer: trace.Tracer | None = None,
        *,
        hold: HoldPolicy | None = None,
        demand: DemandBoard | None = None,
        reservation_timeout_s: float = 0.1,
    ) -> None:
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

    async def _wait_for_instance(
        self, model: str, exclude: set[str], request_id: str
    ) -> list[Candidate]:
        """Hold the request until an instance of ``model`` is ready, recording
        the demand in Redis for the autoscaler (scale from zero)."""
        hold = self._hold
        if exclude or model not in self._view.snapshot.scalable:
            raise ServiceUnavailableError(f"no instance of {model!r} is available",
                                          retry_after_s=2)  # fmt: skip
        if self._num_held >= hold.max_held:
            raise ServiceUnavailableError(
                f"{self._num_held} requests already wait for an instance of {model!r}",
                retry_after_s=max(1, int(hold.timeout_s / 4)),
            )
        self._num_held += 1
        self._metrics.held.inc()
        try:
            if self._demand is not None:
                await _quietly(self._demand.hold(request_id))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + hold.timeout_s
            while loop.time() < deadline:
                await asyncio.sleep(hold.poll_s)
                candidates = self._candidates(model, exclude)
                if candidates:
                    return candidates
            self._metrics.hold_timeouts.inc()
            raise ServiceUnavailableError(
                f"no instance of {model!r} became ready within {hold.timeout_s:g}s",
                retry_after_s=max(1, int(hold.timeout_s / 4)),
            )
        finally:
            self._num_held -= 1
            self._metrics.held.dec()
            if self._demand is not None:
                await _quietly(self._demand.release(request_id))

    def _since(self, c: Candidate) -> float:
        """Reservations newer than this are not yet reflected in ``c``'s report."""
        return c.load.timestamp - self._view.reservation_grace_s

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
            candidates = self._candidates(model, exclude)
            if not candidates:
                candidates = await self._wait_for_instance(model, exclude, body.request_id)
            ranked = self._policy.rank(DispatchContext(request, candidates, self._tick, self._rng))[
                0
            ]
            if best is not None:
                if ranked.instance_id == best.instance_id:
                    return best  # still the best with the fresh count: keep it
                await _quietly(self._reservations.release(best.instance_id, body.request_id))
            best = ranked
            known = best.num_reserved + 1
            self._pending[best.instance_id] = self._pending.get(best.instance_id, 0) + 1
            started = time.perf_counter()
            try:
                count = await asyncio.wait_for(
                    self._reservations.reserve(
                        best.instance_id, body.request_id, since=self._since(best)
                    ),
                    self._reservation_timeout_s,
                )
            except (RedisError, TimeoutError) as exc:
                # Redis is down or starved: dispatch from the last view rather
                # than hold the request (the reservation only refines the view).
                log.warning("reservation skipped for %s: %r", body.request_id, exc)
                self._metrics.reservations_skipped.inc()
                return best
            finally:
                self._pending[best.instance_id] -= 1
                self._metrics.redis_call.labels("reserve").observe(time.perf_counter() - started)
            self._view.snapshot.note_reserved(best.instance_id, count)
            if count <= known:
                return best
        assert best is not None
        return best

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
        exclude: set[str] = set()
        sent = _Sent([])
        failures = replays = 0
        request = body
        while True:
            try:
                with self._tracer.start_as_current_span("gateway.dispatch", context=parent) as sp:
                    chosen = await self._choose(request, model, exclude)
                    sp.set_attribute("shoal.instance_id", chosen.instance_id)
                    sp.set_attribute("shoal.attempt", failures + replays + 1)
            except ShoalError as exc:
                if sent.batches:
                    raise StreamBroken(f"no instance to continue on: {exc.message}") from exc
                raise
            self._metrics.dispatched.labels(chosen.instance_id).inc()
            before = sent.batches
            proxy = self._tracer.start_span("gateway.proxy", context=parent)
            proxy.set_attribute("shoal.instance_id", chosen.instance_id)
            headers = inject_context({}, trace.set_span_in_context(proxy))
            try:
                async for batch in self._follow(chosen.info.address, request, headers):
                    sent.note(batch)
                    yield batch
                return
            except _Broken as exc:
                exclude.add(self._instance_at(exc.address) or chosen.instance_id)
                if not sent.batches:
                    failures += 1
                    self._metrics.retries.inc()
                    log.warning("attempt %d of %s failed on %s: %s", failures, body.request_id,
                                exc.address, exc)  # fmt: skip
                    if failures >= self._retry.max_attempts:
                        raise ServiceUnavailableError(
                            f"no instance could serve the request after {failures} attempts"
                        ) from exc
                    await asyncio.sleep(self._retry.backoff_s * (2 ** (failures - 1)))
                    continue
                replays += 1
                if replays > self._retry.max_replays:
                    raise StreamBroken(str(exc)) from exc
                self._metrics.replays.inc()
                log.warning("%s broke on %s after %d tokens (%s): replaying it elsewhere",
                            body.request_id, exc.address, len(sent.token_ids), exc)  # fmt: skip
                request = sent.replay_of(body, replays)
            except UpstreamRefused as exc:
                if sent.batches:  # the continuation was refused: nothing more to try
                    raise StreamBroken(f"the replay was refused: {exc}") from exc
                raise
            finally:
                proxy.end()
                if sent.batches == before:  # a failed attempt must not keep counting
                    rid = request.request_id or ""
                    await _quietly(self._reservations.release(chosen.instance_id, rid))

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
            stream = self._upstream.resume(moved_to, request.request_id)

    def _instance_at(self, address: str) -> str | None:
        return next((v.info.instance_id for v in self._view.snapshot.instances
                     if v.info.address == address), None)  # fmt: skip


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


def clamp_priority(asked: Priority, maximum: Priority) -> Priority:
    """The effective priority: what was asked, but no higher than allowed."""
    return asked if asked.rank >= maximum.rank else maximum

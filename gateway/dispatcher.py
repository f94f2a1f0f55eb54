"""Dispatch mechanism: snapshot -> policy -> reservation -> upstream stream,
with retries on other instances while nothing has reached the client."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.policies import Candidate, DispatchContext, DispatchPolicy, DispatchRequest
from gateway.reservations import Reservations
from gateway.upstream import InstanceClient, UpstreamError
from gateway.view import ClusterView
from infra.errors import NotFoundError, ServiceUnavailableError
from infra.records import Priority
from infra.telemetry import inject_context
from instance.api import GenerateChunk, GenerateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 0.05


MAX_RESERVE_CONFLICTS = 8


def _prompt_estimate(body: GenerateRequest) -> int:
    """Rough prompt length in tokens (the gateway does not tokenise)."""
    if isinstance(body.prompt, list):
        return max(1, len(body.prompt))
    if isinstance(body.prompt, str):
        return max(1, len(body.prompt) // 4)
    return max(1, sum(len(m.text()) for m in body.messages or []) // 4)


class StreamBroken(Exception):
    """The instance failed after tokens reached the client."""


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
        self._choosing = asyncio.Lock()

    def _candidates(self, model: str, exclude: set[str]) -> list[Candidate]:
        if not self._view.usable:
            raise ServiceUnavailableError("the gateway has no recent view of the cluster")
        snapshot = self._view.snapshot
        if model not in snapshot.models():
            raise NotFoundError(
                f"model {model!r} does not exist; available: {snapshot.models()}",
                param="model", code="model_not_found",
            )  # fmt: skip
        return snapshot.candidates(model, exclude)

    def _since(self, c: Candidate) -> float:
        """Reservations newer than this are not yet reflected in ``c``'s report."""
        return c.load.timestamp - self._view.reservation_grace_s

    async def _choose(self, body: GenerateRequest, model: str, exclude: set[str]) -> Candidate:
        """Rank with the policy and reserve the best instance atomically. If
        another request (here or on another replica) reserved it since our
        snapshot, take the fresh count into account and rank again."""
        assert body.request_id is not None
        request = DispatchRequest(priority=body.priority, num_prompt_tokens=_prompt_estimate(body))
        # One choice at a time in this replica, so its own requests always see
        # each other's reservations; other replicas are caught by the atomic check.
        async with self._choosing:
            try:
                return await self._reserve_best(body, request, model, exclude)
            except RedisError as exc:
                # Redis is down: dispatch from the last view without reserving.
                log.warning("reservation skipped for %s: %s", body.request_id, exc)
                candidates = self._candidates(model, exclude)
                if not candidates:
                    raise ServiceUnavailableError(
                        f"no instance of {model!r} is available", retry_after_s=2
                    ) from exc
                ctx = DispatchContext(request, candidates, self._tick, self._rng)
                return self._policy.rank(ctx)[0]

    async def _reserve_best(
        self, body: GenerateRequest, request: DispatchRequest, model: str, exclude: set[str]
    ) -> Candidate:
        assert body.request_id is not None
        self._tick += 1
        for _ in range(MAX_RESERVE_CONFLICTS):
            candidates = self._candidates(model, exclude)
            if not candidates:
                raise ServiceUnavailableError(
                    f"no instance of {model!r} is available", retry_after_s=2
                )
            best = self._policy.rank(DispatchContext(request, candidates, self._tick, self._rng))[0]
            ok, count = await self._reservations.reserve(
                best.instance_id, body.request_id, since=self._since(best),
                expected=best.num_reserved,
            )  # fmt: skip
            self._view.snapshot.note_reserved(best.instance_id, count)
            log.debug("reserve %s on %s: ok=%s, %d unreflected", body.request_id,
                      best.instance_id, ok, count)  # fmt: skip
            if ok:
                return best
        # Heavy contention: settle for the current best without the check.
        _, count = await self._reservations.reserve(
            best.instance_id, body.request_id, since=self._since(best)
        )
        self._view.snapshot.note_reserved(best.instance_id, count)
        return best

    async def generate(
        self, body: GenerateRequest, model: str, parent: Context | None = None
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Stream the request's chunks from the best instance, retrying elsewhere
        on failure before the first chunk. Raises :class:`StreamBroken` after.
        Each attempt is traced as a ``gateway.dispatch`` span and a
        ``gateway.proxy`` span whose context travels to the instance."""
        assert body.request_id is not None
        exclude: set[str] = set()
        for attempt in range(self._retry.max_attempts):
            with self._tracer.start_as_current_span("gateway.dispatch", context=parent) as span:
                chosen = await self._choose(body, model, exclude)
                span.set_attribute("shoal.instance_id", chosen.instance_id)
                span.set_attribute("shoal.attempt", attempt + 1)
            self._metrics.dispatched.labels(chosen.instance_id).inc()
            started = False
            proxy = self._tracer.start_span("gateway.proxy", context=parent)
            proxy.set_attribute("shoal.instance_id", chosen.instance_id)
            headers = inject_context({}, trace.set_span_in_context(proxy))
            try:
                async for chunk in self._upstream.stream(chosen.info.address, body, headers):
                    started = True
                    yield chunk
                return
            except UpstreamError as exc:
                if started:
                    raise StreamBroken(str(exc)) from exc
                exclude.add(chosen.instance_id)
                self._metrics.retries.inc()
                log.warning("attempt %d of %s failed on %s: %s", attempt + 1,
                            body.request_id, chosen.instance_id, exc)  # fmt: skip
                await asyncio.sleep(self._retry.backoff_s * (2**attempt))
            finally:
                proxy.end()
                if not started:  # a failed attempt must not keep counting
                    await _quietly(self._reservations.release(chosen.instance_id, body.request_id))
        raise ServiceUnavailableError(
            f"no instance could serve the request after {self._retry.max_attempts} attempts"
        )


async def _quietly(coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except Exception as exc:
        log.debug("ignored: %s", exc)


def clamp_priority(asked: Priority, maximum: Priority) -> Priority:
    """The effective priority: what was asked, but no higher than allowed."""
    return asked if asked.rank >= maximum.rank else maximum

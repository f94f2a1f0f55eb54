"""Dispatch mechanism: snapshot -> policy -> reservation -> upstream stream,
with retries on other instances while nothing has reached the client."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from gateway.metrics import GatewayMetrics
from gateway.policies import Candidate, DispatchContext, DispatchPolicy, DispatchRequest
from gateway.reservations import Reservations
from gateway.upstream import InstanceClient, UpstreamError
from gateway.view import ClusterView
from infra.errors import NotFoundError, ServiceUnavailableError
from infra.records import Priority
from instance.api import GenerateChunk, GenerateRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 0.05


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
    ) -> None:
        self._view = view
        self._policy = policy
        self._reservations = reservations
        self._upstream = upstream
        self._metrics = metrics
        self._retry = retry
        self._tick = 0
        self._rng = random.Random()

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

    async def _choose(self, body: GenerateRequest, model: str, exclude: set[str]) -> Candidate:
        candidates = self._candidates(model, exclude)
        if not candidates:
            raise ServiceUnavailableError(f"no instance of {model!r} is available", retry_after_s=2)
        prompt_chars = len(body.prompt) if isinstance(body.prompt, list | str) else 0
        if body.messages:
            prompt_chars = sum(len(m.text()) for m in body.messages)
        request = DispatchRequest(
            priority=body.priority, num_prompt_tokens=max(1, prompt_chars // 4)
        )
        ctx = DispatchContext(request, candidates, tick=self._tick, rng=self._rng)
        self._tick += 1
        ranking = self._policy.rank(ctx)
        assert body.request_id is not None
        # Optimistic reservation: take the best instance unless another replica
        # reserved it since our snapshot; then the next; else the best anyway.
        for c in ranking:
            if await self._reservations.reserve(c.instance_id, body.request_id, c.num_reserved):
                return c
        await self._reservations.reserve(ranking[0].instance_id, body.request_id)
        return ranking[0]

    async def generate(
        self, body: GenerateRequest, model: str, headers: dict[str, str]
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Stream the request's chunks from the best instance, retrying elsewhere
        on failure before the first chunk. Raises :class:`StreamBroken` after."""
        assert body.request_id is not None
        exclude: set[str] = set()
        for attempt in range(self._retry.max_attempts):
            chosen = await self._choose(body, model, exclude)
            self._metrics.dispatched.labels(chosen.instance_id).inc()
            started = False
            try:
                async for chunk in self._upstream.stream(chosen.info.address, body, headers):
                    if not started:
                        started = True
                        await self._reservations.release(chosen.instance_id, body.request_id)
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
                if not started:
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

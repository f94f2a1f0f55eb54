"""Assemble and run a gateway replica from settings (``shoal gateway``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis

from gateway.app import GatewayState, create_app
from gateway.dispatcher import Dispatcher, RetryPolicy
from gateway.metrics import GatewayMetrics
from gateway.policies import make_policy
from gateway.reservations import Reservations
from gateway.upstream import InstanceClient
from gateway.view import ClusterView
from infra.embedded_redis import resolve_redis
from infra.keys import KeySchema
from infra.records import Priority
from infra.serving import run_server
from infra.settings import GatewaySettings
from infra.store import StateStore
from infra.telemetry import make_tracer, new_registry

log = logging.getLogger(__name__)


def build_app(settings: GatewaySettings, redis_url: str) -> FastAPI:
    policy = make_policy(settings.dispatch_policy)  # fails fast on a bad name
    max_priority = Priority(settings.default_max_priority)

    @contextlib.asynccontextmanager
    async def state() -> AsyncIterator[GatewayState]:
        redis = Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        keys = KeySchema(settings.namespace)
        reservations = Reservations(redis, keys, settings.reservation_ttl_s)
        view = ClusterView(StateStore(redis, keys), reservations,
                           refresh_interval_s=settings.view_refresh_interval_s,
                           max_staleness_s=settings.view_max_staleness_s,
                           reservation_grace_s=settings.reservation_grace_s)  # fmt: skip
        timeout = httpx.Timeout(None, connect=settings.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        client = httpx.AsyncClient(timeout=timeout, limits=limits)
        metrics = GatewayMetrics(new_registry())
        retry = RetryPolicy(settings.max_attempts, settings.retry_backoff_s)
        dispatcher = Dispatcher(view, policy, reservations, InstanceClient(client), metrics, retry)
        stop = asyncio.Event()
        with contextlib.suppress(Exception):
            await view.refresh()
        refresher = asyncio.create_task(view.run(stop), name="cluster-view")
        try:
            yield GatewayState(view, dispatcher, metrics, max_priority,
                               make_tracer("shoal-gateway", settings.otlp_endpoint))  # fmt: skip
        finally:
            stop.set()
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await client.aclose()
            await redis.aclose()

    return create_app(state, max_body_bytes=settings.max_body_bytes)


async def serve(settings: GatewaySettings) -> None:
    url, owned = resolve_redis(settings.redis_url, settings.run_dir)
    assert url is not None
    try:
        app = build_app(settings, url)
        log.info("gateway on http://%s:%d (policy %s)", settings.host, settings.port,
                 settings.dispatch_policy)  # fmt: skip
        await run_server(app, settings.host, settings.port)
    finally:
        if owned is not None:
            owned.stop()

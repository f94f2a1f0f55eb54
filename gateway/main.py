"""Assemble and run a gateway replica from settings (``shoal gateway``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis

from gateway.app import GatewayState, create_app
from gateway.auth import KeyRing, load_keys_file
from gateway.dispatcher import Dispatcher, HoldPolicy, RetryPolicy
from gateway.metrics import GatewayMetrics
from gateway.policies import DispatchPolicy, make_policy
from gateway.reservations import Reservations
from gateway.upstream import InstanceClient, make_session
from gateway.view import ClusterView
from infra.demand import DemandBoard
from infra.embedded_redis import resolve_redis
from infra.keys import KeySchema
from infra.records import Priority
from infra.serving import run_server
from infra.settings import GatewaySettings
from infra.store import StateStore
from infra.telemetry import make_tracer, new_registry
from infra.traffic_board import TrafficBoard

log = logging.getLogger(__name__)


def build_app(settings: GatewaySettings, redis_url: str) -> FastAPI:
    policy = make_policy(settings.dispatch_policy)  # fails fast on a bad name
    max_priority = Priority(settings.default_max_priority)  # and on a bad priority

    @contextlib.asynccontextmanager
    async def state() -> AsyncIterator[GatewayState]:
        redis = Redis(connection_pool=_redis_pool(redis_url))
        session = make_session(
            settings.connect_timeout_s, settings.cluster_keys(), settings.cluster_tls()
        )
        try:
            gateway = _assemble(settings, policy, max_priority, redis, session)
            async with _refreshing(gateway):
                yield gateway
        finally:
            await session.close()
            await redis.aclose()

    return create_app(state, max_body_bytes=settings.max_body_bytes)


def _redis_pool(redis_url: str) -> BlockingConnectionPool:
    """A bounded pool that makes callers wait for a connection (instead of
    failing) when many requests reserve at once."""
    return BlockingConnectionPool.from_url(
        redis_url, max_connections=64, timeout=1.0, socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )  # fmt: skip


def _assemble(settings: GatewaySettings, policy: DispatchPolicy, max_priority: Priority,
              redis: Redis, session: aiohttp.ClientSession) -> GatewayState:  # fmt: skip
    """The replica's long-lived objects, wired together."""
    keys_schema = KeySchema(settings.namespace)
    reservations = Reservations(redis, keys_schema, settings.reservation_ttl_s)
    demand = DemandBoard(redis, keys_schema)
    metrics = GatewayMetrics(new_registry())
    view = ClusterView(StateStore(redis, keys_schema), reservations,
                       refresh_interval_s=settings.view_refresh_interval_s,
                       max_staleness_s=settings.view_max_staleness_s,
                       demand=demand,
                       on_refresh=metrics.redis_call.labels("refresh").observe)  # fmt: skip
    metrics.view_age.set_function(lambda: view.age_s)
    retry = RetryPolicy(settings.max_attempts, settings.retry_backoff_s, settings.max_replays)
    tracer = make_tracer("shoal-gateway", settings.otlp_endpoint)
    hold = HoldPolicy(settings.max_held_requests, settings.hold_timeout_s)
    client = InstanceClient(session)
    dispatcher = Dispatcher(view, policy, reservations, client, metrics, retry,
                            tracer, hold=hold, demand=demand,
                            reservation_timeout_s=settings.reservation_timeout_s)  # fmt: skip
    file_keys = load_keys_file(settings.keys_file) if settings.keys_file else {}
    keys = KeyRing(redis, keys_schema, file_keys)
    return GatewayState(view, dispatcher, metrics, max_priority, tracer, keys, client,
                        traffic_board=TrafficBoard(redis, keys_schema))  # fmt: skip


@contextlib.asynccontextmanager
async def _refreshing(gateway: GatewayState) -> AsyncIterator[None]:
    """The cluster view and the API keys refreshed from Redis in the
    background (a first time before the gateway serves, if Redis answers)."""
    stop = asyncio.Event()
    with contextlib.suppress(Exception):
        await gateway.view.refresh()
        await gateway.keys.refresh()
    tasks = [
        asyncio.create_task(gateway.view.run(stop), name="cluster-view"),
        asyncio.create_task(_refresh_keys(gateway.keys, stop), name="api-keys"),
    ]
    if gateway.traffic_board is not None:
        flush = gateway.traffic.run(gateway.traffic_board, stop)
        tasks.append(asyncio.create_task(flush, name="traffic"))
    try:
        yield
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _refresh_keys(keys: KeyRing, stop: asyncio.Event, interval_s: float = 1.0) -> None:
    while not stop.is_set():
        await asyncio.sleep(interval_s)
        try:
            await keys.refresh()
        except Exception as exc:  # Redis down: keep the keys we have
            log.debug("API key refresh failed: %s", exc)


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

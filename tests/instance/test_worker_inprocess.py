"""The worker assembled in-process over the sim engine: tracing joins the
caller's trace, and an engine that dies takes the instance out of the registry."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from infra.keys import KeySchema
from infra.store import StateStore
from infra.telemetry import new_registry
from instance.metrics import InstanceMetrics
from instance.reporter import ReporterConfig
from instance.server import create_app
from instance.sim.core import SimConfig
from instance.sim.engine import SimEngine
from instance.sim.latency import LatencyModel
from instance.worker import InstanceWorker, WorkerConfig


def make_worker(store: StateStore | None) -> InstanceWorker:
    engine = SimEngine(
        SimConfig(num_blocks=64, block_size=16, max_num_seqs=4, latency=LatencyModel().scaled(100)),
        max_model_len=512,
    )
    config = WorkerConfig(
        instance_id=f"inproc-{uuid.uuid4().hex[:6]}",
        address="http://127.0.0.1:1",
        served_model_name="sim",
        vocab_size=256,
        report=ReporterConfig(interval_s=0.02, ttl_s=5),
        health_check_interval_s=0.05,
    )
    return InstanceWorker(engine, config, store, InstanceMetrics(new_registry()))


async def test_instance_span_joins_the_callers_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = make_worker(None)
    app = create_app(worker, tracer=provider.get_tracer("test"))
    await worker.start()
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as c:
            resp = await c.post(
                "/generate", json={"prompt": "hi", "max_tokens": 2}, headers=headers
            )
        assert resp.status_code == 200
    finally:
        await worker.stop()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["instance.generate"]
    assert format(spans[0].context.trace_id, "032x") == trace_id
    assert spans[0].attributes is not None
    assert spans[0].attributes["shoal.request_id"] == resp.json()["request_id"]


async def test_dead_engine_marks_unhealthy_and_deregisters(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    store = StateStore(redis, KeySchema(f"dead-{uuid.uuid4().hex[:6]}"))
    worker = make_worker(store)
    app = create_app(worker)
    await worker.start()
    try:
        await worker.reporter.publish_once()
        assert await store.get_instance(worker.config.instance_id) is not None
        engine = worker.engine
        assert isinstance(engine, SimEngine) and engine._task is not None
        engine._task.cancel()  # the engine loop is gone: the engine is dead
        for _ in range(100):
            if await store.get_instance(worker.config.instance_id) is None:
                break
            await asyncio.sleep(0.05)
        assert await store.get_instance(worker.config.instance_id) is None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as c:
            assert (await c.get("/health")).status_code == 503
            resp = await c.post("/generate", json={"prompt": "hi", "max_tokens": 2})
            assert resp.status_code == 503
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["type"] == "service_unavailable"
    finally:
        await worker.stop()
        await redis.aclose()

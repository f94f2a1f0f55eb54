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

from gateway.reservations import Reservations
from infra.cluster_auth import CLUSTER_HEADER, ClusterKeys, Purpose
from infra.contract import SamplingSpec
from infra.keys import KeySchema
from infra.records import LoadReport
from infra.store import StateStore
from infra.telemetry import new_registry
from instance.engine import EngineRequest
from instance.metrics import InstanceMetrics
from instance.reporter import ReporterConfig
from instance.server import create_app
from instance.sim.core import SimConfig
from instance.sim.engine import SimEngine
from instance.sim.latency import LatencyModel
from instance.worker import InstanceWorker, WorkerConfig
from tests.helpers import CLUSTER


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
    app = create_app(worker, keys=CLUSTER, tracer=provider.get_tracer("test"))
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
    app = create_app(worker, keys=CLUSTER)
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


ROTATED = ClusterKeys.of("new-secret", previous="old-secret")
INTERNAL = [("POST", "/generate"), ("GET", "/requests"), ("POST", "/abort/r-1"),
            ("POST", "/status"), ("POST", "/migrate"), ("GET", "/resume/r-1"),
            ("GET", "/migrations"), ("POST", "/v1/completions"), ("GET", "/info"),
            ("GET", "/load"), ("POST", "/tokenize")]  # fmt: skip


def _token(secret: str) -> str:
    token = ClusterKeys.of(secret).token(Purpose.HTTP)
    assert token is not None
    return token


async def test_internal_endpoints_need_the_cluster_credential() -> None:
    """Without the credential, or with a wrong one, every internal endpoint is
    a 401 in OpenAI's form (counted); with the current secret's, or the
    previous one's during a rotation, the call goes through; the probes and
    the metrics stay open."""
    worker = make_worker(None)
    app = create_app(worker, keys=ROTATED)
    await worker.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as c:
            for wrong in ("", _token("another-secret"), "not-even-hex"):
                for method, path in INTERNAL:
                    resp = await c.request(method, path, headers={CLUSTER_HEADER: wrong})
                    assert resp.status_code == 401, (path, resp.text)
                    assert resp.json()["error"]["type"] == "authentication_error"
            for secret in ("new-secret", "old-secret"):
                ok = await c.post("/generate", json={"prompt": "hi", "max_tokens": 2},
                                  headers={CLUSTER_HEADER: _token(secret)})  # fmt: skip
                assert ok.status_code == 200, ok.text
            for path in ("/health", "/ready", "/version"):
                assert (await c.get(path, headers={CLUSTER_HEADER: ""})).status_code == 200
            metrics = (await c.get("/metrics", headers={CLUSTER_HEADER: ""})).text
    finally:
        await worker.stop()
    refused = 3 * len(INTERNAL)
    assert 'shoal_instance_unauthenticated_calls_total{path="/generate"} 3.0' in metrics
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("shoal_instance_unauthenticated_calls_total{"))  # fmt: skip
    assert counted == refused


def test_credentials_are_per_purpose_and_secret() -> None:
    http, kv = ROTATED.token(Purpose.HTTP), ROTATED.token(Purpose.KV)
    assert http and kv and http != kv and "new-secret" not in http
    assert ROTATED.accepts(http, Purpose.HTTP) and not ROTATED.accepts(http, Purpose.KV)
    assert ROTATED.accepts(_token("old-secret"), Purpose.HTTP)  # during a rotation
    assert not ClusterKeys.of("new-secret").accepts(_token("old-secret"), Purpose.HTTP)
    assert not ROTATED.accepts(None, Purpose.HTTP) and not ROTATED.accepts("", Purpose.HTTP)
    assert ClusterKeys.open().accepts(None, Purpose.KV)  # an open cluster lets anyone in
    assert ClusterKeys.open().headers() == {}


async def test_direct_requests_when_allowed_are_capped_at_normal_and_counted() -> None:
    """With direct requests allowed (debugging), a caller without the
    credential may generate, at no more than normal priority and counted,
    but still not reach the control or migration surfaces."""
    worker = make_worker(None)
    app = create_app(worker, keys=ROTATED, allow_direct=True)
    await worker.start()
    outsider = {CLUSTER_HEADER: ""}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w") as c:
            chat = await c.post("/v1/completions", json={"model": "sim", "prompt": "hi",
                                "max_tokens": 2}, headers={**outsider,
                                "x-request-priority": "high"})  # fmt: skip
            assert chat.status_code == 200 and chat.headers["x-request-priority"] == "normal"
            asked = {"prompt": "hi", "max_tokens": 2, "priority": "high", "migratable": True}
            gen = await c.post("/generate", json=asked, headers=outsider)
            assert gen.status_code == 200, gen.text
            member = await c.post("/v1/completions", json={"model": "sim", "prompt": "hi",
                                  "max_tokens": 2}, headers={"x-request-priority": "high",
                                  CLUSTER_HEADER: _token("new-secret")})  # fmt: skip
            assert member.headers["x-request-priority"] == "high"  # the control plane's stands
            for method, path in INTERNAL:
                if not path.startswith(("/generate", "/v1/", "/tokenize")):
                    assert (await c.request(method, path, headers=outsider)).status_code == 401
            metrics = (await c.get("/metrics")).text
    finally:
        await worker.stop()
    assert 'shoal_instance_direct_requests_total{path="/generate"} 1.0' in metrics
    assert 'shoal_instance_direct_requests_total{path="/v1/completions"} 1.0' in metrics
    assert 'shoal_instance_requests_total{finish_reason="length",priority="high"} 1.0' in metrics
    assert 'shoal_instance_requests_total{finish_reason="length",priority="normal"} 2.0' in metrics


async def test_a_reservation_ends_with_the_first_report_that_counts_its_request(
    redis_url: str,
) -> None:
    """However long a request takes to reach its instance, Redis counts it
    exactly once at every moment: in the gateway's reservation until the load
    report that counts it (running or waiting, then finished), which removes
    the reservation in its transaction."""
    keys = KeySchema(f"resv-{uuid.uuid4().hex[:6]}")
    redis = Redis.from_url(redis_url)
    worker = make_worker(StateStore(redis, keys))
    me = worker.config.instance_id
    reservations = Reservations(redis, keys, ttl_s=60)
    await worker.start()
    try:
        assert await reservations.reserve(me, "r-counted") == 1
        await asyncio.sleep(0.1)  # reports go out while the request is on its way
        seen: list[tuple[int, int, int]] = []  # (reserved, in the report, finished)

        stop = asyncio.Event()  # (not a cancel: a pipeline's execute may swallow one)

        async def observe() -> None:
            while not stop.is_set():
                async with redis.pipeline(transaction=True) as pipe:  # one consistent read
                    pipe.get(keys.load(me))
                    pipe.zcard(keys.reserved(me))
                    raw, reserved = await pipe.execute()
                if raw is None:
                    raise AssertionError("the instance's load report is missing")
                report = LoadReport.model_validate_json(raw)
                counted = report.num_running + report.num_waiting
                seen.append((int(reserved), counted, report.num_finished_total))
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(observe())
        request = EngineRequest("r-counted", tuple(range(1, 20)), SamplingSpec(max_tokens=300))
        chunks = [c async for c in worker.run(request, migratable=True)]  # to its end
        assert chunks[-1].finish_reason == "length"
        await asyncio.sleep(0.1)  # and after its end
        stop.set()
        await watcher
        assert seen[0] == (1, 0, 0) and (0, 1, 0) in seen and seen[-1] == (0, 0, 1), seen
        assert all(sum(s) == 1 for s in seen), set(seen)
        _, reserved = await StateStore(redis, keys).list_with_reservations(0)
        assert reserved == {me: 0}
    finally:
        await worker.stop()
        await redis.aclose()

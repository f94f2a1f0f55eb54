"""HTTP face of the instance worker (FastAPI)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.cluster_auth import ClusterKeys
from infra.contract import (
    AbortResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    Usage,
)
from infra.errors import BadRequestError, ServiceUnavailableError, install_error_handlers
from infra.http import BodyLimitMiddleware, ClusterAuthMiddleware, is_direct, unless_disconnected
from infra.ndjson import NDJSON_MEDIA_TYPE, ndjson
from infra.records import InstanceInfo, InstanceStatus, LoadReport, Priority, StatusChange
from infra.telemetry import extract_context
from infra.tls import PLAIN, ClusterTls
from instance.engine import EngineRequest
from instance.migration_host import WorkerMigrationHost
from instance.openai_routes import add_openai_routes
from instance.worker import InstanceWorker
from migration.routes import MigrationService, add_migration_routes

log = logging.getLogger(__name__)


OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/version"})
"""What an instance answers without the cluster credential: probes and metrics
(no prompt, output or request id in them)."""

DIRECT_PREFIXES = ("/generate", "/v1/", "/tokenize", "/detokenize")
"""What a caller without the credential may use when direct requests are
allowed (debugging): generation, never the control or migration surfaces."""


def create_app(
    worker: InstanceWorker,
    *,
    keys: ClusterKeys,
    tls: ClusterTls = PLAIN,
    allow_direct: bool = False,
    tracer: trace.Tracer | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
) -> FastAPI:
    """The instance's HTTP API; every call but :data:`OPEN_PATHS` needs the
    cluster credential of ``keys`` (none, in an open cluster). With
    ``allow_direct``, :data:`DIRECT_PREFIXES` serve calls without it too, as
    direct requests (at most ``normal``, never migrated). ``tls``: how it
    reaches other instances' ``https://`` addresses."""
    migrations = MigrationService(WorkerMigrationHost(worker), keys=keys, tls=tls)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            async with migrations.running():
                yield
        finally:
            await worker.stop()

    app = FastAPI(title="Shoal instance worker", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    def refused(path: str) -> None:
        worker.metrics.unauthenticated.labels("/" + path.strip("/").split("/")[0]).inc()

    app.add_middleware(ClusterAuthMiddleware, keys=keys, open_paths=OPEN_PATHS, on_refused=refused,
                       direct_prefixes=DIRECT_PREFIXES if allow_direct else ())  # fmt: skip
    _add_generation_routes(app, worker, tracer or trace.NoOpTracer())
    _add_control_routes(app, worker)
    add_openai_routes(app, worker)
    add_migration_routes(app, migrations)
    return app


def _add_generation_routes(app: FastAPI, worker: InstanceWorker, tracer: trace.Tracer) -> None:
    """``/generate`` (streamed NDJSON or whole) and ``/abort/{id}``."""

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> Response:
        if is_direct(request):  # not from the control plane: no more than normal, never moved
            worker.metrics.direct.labels("/generate").inc()
            body = body.model_copy(update={"priority": body.priority.at_most(Priority.NORMAL),
                                           "migratable": False, "resume_token": None})  # fmt: skip
        ctx = extract_context(dict(request.headers))
        with tracer.start_as_current_span("instance.generate", context=ctx) as span:
            ereq = worker.prepare(body)
            span.set_attribute("shoal.request_id", ereq.request_id)
            span.set_attribute("shoal.priority", ereq.priority.value)
            span.set_attribute("shoal.prompt_tokens", len(ereq.prompt_token_ids))
        if body.stream:
            chunks = worker.run(
                ereq,
                migratable=body.migratable,
                continuation=body.continuation,
                resume_token=body.resume_token,
            )
            return StreamingResponse(ndjson(ereq.request_id, chunks), media_type=NDJSON_MEDIA_TYPE)
        if body.continuation is not None:
            raise BadRequestError("a continuation is streamed", param="stream")
        return await _whole(worker, ereq, request)

    @app.post("/abort/{request_id}", response_model=AbortResponse)
    async def abort(request_id: str) -> AbortResponse:
        return AbortResponse(request_id=request_id, aborted=await worker.abort(request_id))


def _health(worker: InstanceWorker, ok: bool) -> JSONResponse:
    status = "ok" if ok else ("starting" if worker.healthy else "unhealthy")
    body = HealthResponse(status=status, instance_id=worker.config.instance_id,
                          engine=worker.engine.kind)  # fmt: skip
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _add_control_routes(app: FastAPI, worker: InstanceWorker) -> None:
    """Health, readiness, identity, load, status changes and metrics."""

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        return _health(worker, worker.healthy)

    @app.get("/ready", response_model=HealthResponse)
    async def ready() -> JSONResponse:
        return _health(worker, worker.healthy and worker.status is InstanceStatus.ACTIVE)

    @app.get("/info", response_model=InstanceInfo)
    async def info() -> InstanceInfo:
        return worker.info()

    @app.get("/load", response_model=LoadReport)
    async def load() -> Response:
        report = worker.reporter.build_report()
        return Response(report.model_dump_json(), media_type="application/json")

    @app.post("/status", response_model=InstanceInfo)
    async def set_status(change: StatusChange) -> InstanceInfo:
        if not worker.healthy:
            raise ServiceUnavailableError("instance is unhealthy")
        worker.set_status(change.status)
        await worker.reporter.publish_once()
        return worker.info()

    @app.get("/metrics")
    async def metrics() -> Response:
        worker.reporter.build_report()
        if (port := worker.engine.kv_port) is not None:
            try:  # a scrape answers even when the KV port does not
                worker.metrics.observe_kv(await asyncio.wait_for(port.status(), 2.0))
            except Exception as exc:
                log.debug("KV port status for /metrics failed: %s", exc)
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _collect(worker: InstanceWorker, ereq: EngineRequest) -> GenerateResponse:
    token_ids: list[int] = []
    text: list[str] = []
    finish: str | None = None
    usage: Usage | None = None
    chunks = worker.run(ereq)
    try:
        async for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            text.append(chunk.text)
            if chunk.finish_reason is not None:
                finish, usage = chunk.finish_reason, chunk.usage
    finally:
        await chunks.aclose()
    if usage is None:
        raise ServiceUnavailableError("the engine stopped before the request finished")
    return GenerateResponse(
        request_id=ereq.request_id,
        token_ids=token_ids,
        text="".join(text),
        finish_reason=finish,
        usage=usage,
    )


async def _whole(worker: InstanceWorker, ereq: EngineRequest, request: Request) -> Response:
    """Run a non-streaming request, aborting it if the client disconnects."""
    result = await unless_disconnected(request, _collect(worker, ereq))
    if result is None:
        log.info("client of %s went away: aborted", ereq.request_id)
        return Response(status_code=499)
    return Response(result.model_dump_json(), media_type="application/json")

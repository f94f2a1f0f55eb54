"""The gateway's HTTP face: OpenAI-compatible endpoints over the dispatcher."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ApiKey, KeyRing
from gateway.dispatcher import Dispatcher, clamp_priority
from gateway.metrics import GatewayMetrics
from gateway.upstream import UpstreamRefused
from gateway.view import ClusterView
from infra.contract import GenerateChunk
from infra.errors import ShoalError, install_error_handlers
from infra.http import BodyLimitMiddleware, unless_disconnected
from infra.openai_protocol.models import (
    PRIORITY_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    priority_from_header,
)
from infra.openai_protocol.render import sse_events, whole_response
from infra.openai_protocol.routes import add_completion_routes
from infra.openai_protocol.translate import to_generate
from infra.records import Priority
from infra.telemetry import extract_context

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    view: ClusterView
    dispatcher: Dispatcher
    metrics: GatewayMetrics
    max_priority: Priority
    """Highest priority allowed when authentication is off."""
    tracer: trace.Tracer
    keys: KeyRing


def _priority(header: str | None, maximum: Priority) -> Priority:
    return clamp_priority(priority_from_header(header), maximum)


def _refused(exc: UpstreamRefused) -> ShoalError:
    err = ShoalError(exc.detail.message, param=exc.detail.param, code=exc.detail.code)
    err.status_code = exc.status_code
    err.error_type = exc.detail.type
    return err


@dataclass
class _Call:
    """One OpenAI call in flight: what it is, and the timing it reports."""

    rid: str
    created: int
    model: str
    chat: bool
    include_usage: bool
    priority: Priority
    started: float
    metrics: GatewayMetrics
    key: ApiKey | None = None
    keys: KeyRing | None = None
    span: trace.Span = trace.INVALID_SPAN
    first_at: float | None = None
    num_chunks: int = 0

    async def charge(self, usage: Usage | None) -> None:
        """Count the tokens against the caller's per-minute token limit."""
        if usage is not None and self.key is not None and self.keys is not None:
            await self.keys.record_tokens(self.key, usage.total_tokens)

    def observe(self, chunk: GenerateChunk) -> None:
        if chunk.token_ids and self.first_at is None:
            self.first_at = time.perf_counter()
            self.metrics.ttft.labels(self.priority.value).observe(self.first_at - self.started)
        self.num_chunks += len(chunk.token_ids)

    def done(self, status: str) -> None:
        self.span.set_attribute("shoal.status", status)
        self.span.end()
        now = time.perf_counter()
        p = self.priority.value
        self.metrics.requests.labels(status, p).inc()
        self.metrics.e2e.labels(p).observe(now - self.started)
        if self.first_at is not None and self.num_chunks > 1:
            self.metrics.tpot.labels(p).observe((now - self.first_at) / (self.num_chunks - 1))


def create_app(make_state: Callable[[], contextlib.AbstractAsyncContextManager[GatewayState]],
               *, max_body_bytes: int) -> FastAPI:  # fmt: skip
    """The gateway app; ``make_state`` builds (and tears down) its long-lived
    objects inside the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_state() as state:
            app.state.shoal = state
            yield

    app = FastAPI(title="Shoal gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    def state(request: Request) -> GatewayState:
        s: GatewayState = request.app.state.shoal
        return s

    async def serve(request: Request, body: ChatCompletionRequest | CompletionRequest,
                    priority_header: str | None) -> Response:  # fmt: skip
        st = state(request)
        key = st.keys.authenticate(request.headers.get("authorization"))
        priority = _priority(priority_header, key.max_priority if key else st.max_priority)
        if key is not None:
            await st.keys.admit(key)
        chat = isinstance(body, ChatCompletionRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        # The request's span joins the client's trace if it sent a traceparent;
        # it ends when the response does (see _Call.done).
        span = st.tracer.start_span("gateway.request", context=extract_context(request.headers))
        span.set_attribute("shoal.request_id", rid)
        span.set_attribute("shoal.priority", priority.value)
        call = _Call(rid, int(time.time()), body.model, chat, body.include_usage, priority,
                     time.perf_counter(), st.metrics, key, st.keys, span)  # fmt: skip
        st.metrics.inflight.inc()
        try:
            parent = trace.set_span_in_context(call.span)
            chunks = st.dispatcher.generate(
                to_generate(body, rid, priority, migratable=True), body.model, parent
            )
            try:
                first = await anext(chunks)
            except UpstreamRefused as exc:
                call.done(str(exc.status_code))
                raise _refused(exc) from exc
            except ShoalError as exc:
                call.done(str(exc.status_code))
                raise
            out_headers = {PRIORITY_HEADER: priority.value}
            if body.stream:
                stream = sse_events(call, first, chunks)
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers=out_headers
                )
            response = await unless_disconnected(request, whole_response(call, first, chunks))
            if response is None:
                call.done("disconnected")
                return Response(status_code=499)
            response.headers.update(out_headers)
            return response
        finally:
            st.metrics.inflight.dec()

    add_completion_routes(app, serve)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        snapshot = state(request).view.snapshot
        created = {v.info.model: int(v.info.started_at) for v in snapshot.instances}
        return ModelList(data=[ModelCard(id=m, created=created.get(m, 0))
                               for m in snapshot.models()])  # fmt: skip

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        view = state(request).view
        ready = view.fresh
        body = {"status": "ok" if ready else "not ready",
                "instances": len(view.snapshot.instances)}  # fmt: skip
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        st = state(request)
        st.metrics.instances.set(len(st.view.snapshot.instances))
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

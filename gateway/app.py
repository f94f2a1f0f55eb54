"""The gateway's HTTP face: OpenAI-compatible endpoints over the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ApiKey, KeyRing
from gateway.dispatcher import Dispatcher, StreamBroken, clamp_priority
from gateway.metrics import GatewayMetrics
from gateway.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from gateway.translate import (
    chat_chunk,
    chat_usage_chunk,
    chat_whole,
    completion_chunk,
    completion_usage_chunk,
    completion_whole,
    to_generate,
    usage_of,
)
from gateway.upstream import UpstreamRefused
from gateway.view import ClusterView
from infra.errors import (
    BadRequestError,
    ErrorDetail,
    ServiceUnavailableError,
    ShoalError,
    install_error_handlers,
)
from infra.http import BodyLimitMiddleware, unless_disconnected
from infra.records import Priority
from infra.telemetry import extract_context
from instance.api import GenerateChunk

log = logging.getLogger(__name__)

PRIORITY_HEADER = "X-Request-Priority"


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
    if header is None or not header.strip():
        asked = Priority.NORMAL
    else:
        try:
            asked = Priority(header.strip().lower())
        except ValueError:
            raise BadRequestError(
                f"{PRIORITY_HEADER} must be one of high, normal, low (got {header!r})",
                param=PRIORITY_HEADER,
            ) from None
    return clamp_priority(asked, maximum)


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


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def _sse_stream(
    call: _Call, first: GenerateChunk, chunks: AsyncGenerator[GenerateChunk, None]
) -> AsyncIterator[bytes]:
    usage: Usage | None = None
    status = "ok"
    try:
        chunk: GenerateChunk | None = first
        is_first = True
        while chunk is not None:
            call.observe(chunk)
            usage = usage_of(chunk) or usage
            if chunk.error is not None:
                raise StreamBroken(chunk.error.message)
            body = (
                chat_chunk(call.rid, call.created, call.model, chunk, is_first)
                if call.chat
                else completion_chunk(call.rid, call.created, call.model, chunk)
            )
            yield _sse(body.model_dump_json())
            is_first = False
            chunk = await anext(chunks, None)
        await call.charge(usage)
        if call.include_usage and usage is not None:
            make = chat_usage_chunk if call.chat else completion_usage_chunk
            yield _sse(make(call.rid, call.created, call.model, usage).model_dump_json())
    except StreamBroken as exc:
        status = "broken"
        log.warning("stream %s broke after the first token: %s", call.rid, exc)
        detail = ErrorDetail(message=f"the instance failed mid-stream: {exc}",
                             type="server_error", code="upstream_failed")  # fmt: skip
        yield _sse(json.dumps({"error": detail.model_dump()}))
    except asyncio.CancelledError:
        status = "disconnected"
        raise
    finally:
        await chunks.aclose()
        call.done(status)
    yield _sse("[DONE]")


async def _collect(
    call: _Call, first: GenerateChunk, chunks: AsyncGenerator[GenerateChunk, None]
) -> Response:
    texts: list[str] = []
    finish: str | None = None
    usage: Usage | None = None
    try:
        chunk: GenerateChunk | None = first
        while chunk is not None:
            call.observe(chunk)
            if chunk.error is not None:
                raise StreamBroken(chunk.error.message)
            texts.append(chunk.text)
            finish = chunk.finish_reason or finish
            usage = usage_of(chunk) or usage
            chunk = await anext(chunks, None)
    except StreamBroken as exc:
        call.done("broken")
        raise ServiceUnavailableError(f"the instance failed mid-request: {exc}") from exc
    finally:
        await chunks.aclose()
    assert usage is not None, "the instance ended a request without usage"
    await call.charge(usage)
    call.done("ok")
    make = chat_whole if call.chat else completion_whole
    body = make(call.rid, call.created, call.model, "".join(texts), finish, usage)
    return Response(body.model_dump_json(), media_type="application/json")


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
            chunks = st.dispatcher.generate(to_generate(body, rid, priority), body.model, parent)
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
                stream = _sse_stream(call, first, chunks)
                return StreamingResponse(
                    stream, media_type="text/event-stream", headers=out_headers
                )
            response = await unless_disconnected(request, _collect(call, first, chunks))
            if response is None:
                call.done("disconnected")
                return Response(status_code=499)
            response.headers.update(out_headers)
            return response
        finally:
            st.metrics.inflight.dec()

    @app.post("/v1/chat/completions")
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        x_request_priority: str | None = Header(default=None),
    ) -> Response:
        return await serve(request, body, x_request_priority)

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest,
        request: Request,
        x_request_priority: str | None = Header(default=None),
    ) -> Response:
        return await serve(request, body, x_request_priority)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        snapshot = state(request).view.snapshot
        created = {v.info.model: int(v.info.started_at) for v in snapshot.instances}
        return ModelList(data=[ModelCard(id=m, created=created[m]) for m in snapshot.models()])

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

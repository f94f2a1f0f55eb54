"""The gateway's HTTP face: OpenAI-compatible endpoints over the dispatcher."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import ApiKey, KeyRing
from gateway.dispatcher import Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.probes import add_probe_routes
from gateway.traffic import TrafficRecorder
from gateway.upstream import InstanceClient, UpstreamRefused
from gateway.view import ClusterView
from infra.contract import GenerateChunk
from infra.errors import ShoalError, install_error_handlers
from infra.http import BodyLimitMiddleware, unless_disconnected
from infra.openai_protocol.choices import ChoiceBatch, choice_requests, open_choices
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
from infra.openai_protocol.translate import BestOf, to_generate
from infra.records import Priority
from infra.telemetry import extract_context
from infra.traffic_board import TrafficBoard

log = logging.getLogger(__name__)


@dataclass
class GatewayState:
    """A replica's long-lived objects, built in the app's lifespan."""

    view: ClusterView
    """The cluster as this replica sees it, refreshed from Redis."""
    dispatcher: Dispatcher
    """Chooses instances and relays, retries and replays the token streams."""
    metrics: GatewayMetrics
    """The replica's ``shoal_gateway_*`` metrics."""
    max_priority: Priority
    """Highest priority allowed when authentication is off."""
    tracer: trace.Tracer
    """Makes the ``gateway.*`` spans (a no-op tracer without an OTLP endpoint)."""
    keys: KeyRing
    """The API keys (none: authentication is off) and their rate limits."""
    client: InstanceClient
    """Calls to instances outside dispatch (``/tokenize``, ``/detokenize``)."""
    traffic: TrafficRecorder = field(default_factory=TrafficRecorder)
    """Arrivals and latencies for the autoscaler (flushed to ``traffic_board``)."""
    traffic_board: TrafficBoard | None = None
    """Where ``traffic`` goes (None: nowhere, as in tests of the app alone)."""


def _priority(header: str | None, maximum: Priority) -> Priority:
    return priority_from_header(header).at_most(maximum)


def _refused(exc: UpstreamRefused) -> ShoalError:
    err = ShoalError(exc.detail.message, param=exc.detail.param, code=exc.detail.code)
    err.status_code = exc.status_code
    err.error_type = exc.detail.type
    return err


@dataclass
class _Call:
    """One OpenAI call in flight: what it is, and the timing it reports."""

    rid: str
    """The OpenAI response id (``chatcmpl-...`` or ``cmpl-...``), also the request's id."""
    created: int
    """Unix time the call arrived (the response's ``created``)."""
    model: str
    """The model the client asked for."""
    chat: bool
    """A chat completion (else a text completion)."""
    include_usage: bool
    """The client asked for a final usage chunk in its stream."""
    priority: Priority
    """The effective priority (asked, clamped to what the caller may have)."""
    started: float
    """``time.perf_counter()`` when the call arrived."""
    metrics: GatewayMetrics
    """Where the call's latencies and outcome are counted."""
    key: ApiKey | None = None
    """The caller's API key (None: authentication is off)."""
    keys: KeyRing | None = None
    """The key ring that charges the caller's tokens."""
    span: trace.Span = trace.INVALID_SPAN
    """The ``gateway.request`` span, ended by :meth:`done`."""
    continuous_usage: bool = False
    """Every chunk carries the usage so far (``continuous_usage_stats``)."""
    echo: str | None = None
    """The prompt, put before each choice's text (``echo``)."""
    best_of: BestOf | None = None
    """Which of the samples the whole response returns (``best_of``; None: all)."""
    first_at: float | None = None
    """``time.perf_counter()`` when the first token came (None: not yet)."""
    num_tokens: int = 0
    """Output tokens seen so far."""
    traffic: TrafficRecorder | None = None
    """Where the call's arrival, latencies and tokens are recorded for the autoscaler."""

    async def charge(self, usage: Usage | None) -> None:
        """Count the tokens against the caller's per-minute token limit."""
        if usage is not None and self.traffic is not None:
            self.traffic.served(usage.total_tokens)
        if usage is not None and self.key is not None and self.keys is not None:
            await self.keys.record_tokens(self.key, usage.total_tokens)

    def observe(self, chunk: GenerateChunk) -> None:
        if chunk.token_ids and self.first_at is None:
            self.first_at = time.perf_counter()
            self.metrics.ttft.labels(self.priority.value).observe(self.first_at - self.started)
            if self.traffic is not None:
                self.traffic.first_token(self.priority, self.first_at - self.started)
        self.num_tokens += len(chunk.token_ids)

    def done(self, status: str) -> None:
        self.span.set_attribute("shoal.status", status)
        self.span.end()
        now = time.perf_counter()
        p = self.priority.value
        self.metrics.requests.labels(status, p).inc()
        self.metrics.e2e.labels(p).observe(now - self.started)
        if self.first_at is not None and self.num_tokens > 1:
            tpot = (now - self.first_at) / (self.num_tokens - 1)
            self.metrics.tpot.labels(p).observe(tpot)
            if self.traffic is not None:
                self.traffic.finished(self.priority, tpot)


def create_app(make_state: Callable[[], contextlib.AbstractAsyncContextManager[GatewayState]],
               *, max_body_bytes: int) -> FastAPI:  # fmt: skip
    """The gateway app; ``make_state`` builds (and tears down) its long-lived
    objects inside the lifespan."""
    app = FastAPI(title="Shoal gateway", version="0.1.0", lifespan=_lifespan(make_state))
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    add_completion_routes(app, serve)  # POST /v1/chat/completions, POST /v1/completions
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    add_probe_routes(app)  # /health, /version, /tokenize, /detokenize
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


def _lifespan(
    make_state: Callable[[], contextlib.AbstractAsyncContextManager[GatewayState]],
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_state() as state:
            app.state.shoal = state
            yield

    return lifespan


def _state(request: Request) -> GatewayState:
    s: GatewayState = request.app.state.shoal
    return s


# -- the routes -------------------------------------------------------------


async def serve(request: Request, body: ChatCompletionRequest | CompletionRequest,
                priority_header: str | None) -> Response:  # fmt: skip
    """One OpenAI completion call: authenticated and admitted, dispatched, and
    answered as an SSE stream or as one whole response."""
    st = _state(request)
    call = await _open_call(st, request, body, priority_header)
    st.metrics.inflight.inc()
    try:
        parent = trace.set_span_in_context(call.span)
        requests = choice_requests(
            to_generate(body, call.rid, call.priority, migratable=True), body.samples
        )
        first, chunks = await _first_batch(call, open_choices(
            lambda r: st.dispatcher.generate(r, body.model, parent), requests))  # fmt: skip
        return await _respond(request, body.stream, call, first, chunks)
    finally:
        st.metrics.inflight.dec()


async def models(request: Request) -> ModelList:
    snapshot = _state(request).view.snapshot
    created = {v.info.model: int(v.info.started_at) for v in snapshot.instances}
    return ModelList(data=[ModelCard(id=m, created=created.get(m, 0))
                           for m in snapshot.models()])  # fmt: skip


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz(request: Request) -> JSONResponse:
    view = _state(request).view
    ready = view.fresh
    body = {"status": "ok" if ready else "not ready",
            "instances": len(view.snapshot.instances)}  # fmt: skip
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    st = _state(request)
    st.metrics.instances.set(len(st.view.snapshot.instances))
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- the steps of a completion call -------------------------------------------


async def _open_call(st: GatewayState, request: Request,
                     body: ChatCompletionRequest | CompletionRequest,
                     priority_header: str | None) -> _Call:  # fmt: skip
    """Authenticate and admit the caller, settle the priority, start the span."""
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
    st.traffic.arrived()
    return _Call(rid, int(time.time()), body.model, chat, body.include_usage, priority,
                 time.perf_counter(), st.metrics, key, st.keys, span,
                 continuous_usage=body.continuous_usage, echo=body.echo_text,
                 best_of=BestOf.of(body), traffic=st.traffic)  # fmt: skip


async def _first_batch(
    call: _Call, opening: Awaitable[tuple[ChoiceBatch, AsyncGenerator[ChoiceBatch, None]]]
) -> tuple[ChoiceBatch, AsyncGenerator[ChoiceBatch, None]]:
    """The first batch of chunks of every choice, and the rest; a call that
    fails before it ends here, with its error (an instance's refusal passed
    on as the instance gave it)."""
    try:
        return await opening
    except UpstreamRefused as exc:
        call.done(str(exc.status_code))
        raise _refused(exc) from exc
    except ShoalError as exc:
        call.done(str(exc.status_code))
        raise


async def _respond(request: Request, stream: bool, call: _Call, first: ChoiceBatch,
                   chunks: AsyncGenerator[ChoiceBatch, None]) -> Response:  # fmt: skip
    """SSE events for a streaming call; otherwise the whole response once the
    request is done (499 if the client went away first)."""
    headers = {PRIORITY_HEADER: call.priority.value}
    if stream:
        events = sse_events(call, first, chunks)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    response = await unless_disconnected(request, whole_response(call, first, chunks))
    if response is None:
        call.done("disconnected")
        return Response(status_code=499)
    response.headers.update(headers)
    return response

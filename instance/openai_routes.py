"""The worker's own OpenAI-compatible endpoints, as ``vllm serve`` offers:
``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, and the
ones clients probe: ``/version``, ``/tokenize``, ``/detokenize`` (``/health``
is the worker's own, in ``instance.server``).

They let any OpenAI client or third-party router talk to one instance
directly (the gateway uses ``/generate``). ``X-Request-Priority`` is honoured
as sent: an instance trusts its callers."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from infra.contract import ChunkBatch, GenerateChunk
from infra.errors import ServiceUnavailableError
from infra.http import is_direct, unless_disconnected
from infra.openai_protocol.choices import choice_requests, open_choices
from infra.openai_protocol.models import (
    PRIORITY_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    VersionResponse,
    priority_from_header,
    shoal_version,
)
from infra.openai_protocol.render import sse_events, whole_response
from infra.openai_protocol.routes import add_completion_routes
from infra.openai_protocol.translate import BestOf, to_generate
from infra.records import Priority
from instance.engine import chat_messages
from instance.worker import InstanceWorker


@dataclass
class _DirectCall:
    """A call answered by this instance: no dispatch, metering or keys."""

    rid: str
    created: int
    model: str
    chat: bool
    include_usage: bool
    continuous_usage: bool = False
    echo: str | None = None
    best_of: BestOf | None = None

    def observe(self, chunk: GenerateChunk) -> None:
        pass

    async def charge(self, usage: Usage | None) -> None:
        pass

    def done(self, status: str) -> None:
        pass


async def _batches(
    chunks: AsyncGenerator[GenerateChunk, None],
) -> AsyncGenerator[ChunkBatch, None]:
    try:
        async for chunk in chunks:
            yield [chunk]
    finally:
        await chunks.aclose()


def add_openai_routes(app: FastAPI, worker: InstanceWorker) -> None:
    async def serve(
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        priority_header: str | None,
    ) -> Response:
        priority = priority_from_header(priority_header)
        if is_direct(request):  # not from the control plane: no more than normal
            priority = priority.at_most(Priority.NORMAL)
            worker.metrics.direct.labels(request.url.path).inc()
        chat = isinstance(body, ChatCompletionRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        requests = choice_requests(to_generate(body, rid, priority), body.samples)
        prepared = [worker.prepare(r) for r in requests]  # every choice checked first
        call = _DirectCall(rid, int(time.time()), body.model, chat, body.include_usage,
                           body.continuous_usage, body.echo_text, BestOf.of(body))  # fmt: skip
        by_id = {p.request_id: p for p in prepared}
        first, chunks = await open_choices(
            lambda r: _batches(worker.run(by_id[str(r.request_id)])), requests)  # fmt: skip
        if len({i for i, _ in first}) < len(requests):
            await chunks.aclose()
            raise ServiceUnavailableError("the engine stopped before the request started")
        headers = {PRIORITY_HEADER: priority.value}
        if body.stream:
            events = sse_events(call, first, chunks)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        response = await unless_disconnected(request, whole_response(call, first, chunks))
        if response is None:
            return Response(status_code=499)
        response.headers.update(headers)
        return response

    add_completion_routes(app, serve)

    add_probe_routes(app, worker)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        info = worker.info()
        return ModelList(data=[ModelCard(id=info.model, created=int(info.started_at))])


def add_probe_routes(app: FastAPI, worker: InstanceWorker) -> None:
    """``/version``, ``/tokenize`` and ``/detokenize``, as ``vllm serve`` answers them."""

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        kind = worker.engine.kind
        engine_version = getattr(sys.modules.get(kind), "__version__", None)
        return VersionResponse(
            version=shoal_version(), engine=f"{kind} {engine_version}" if engine_version else kind
        )

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        worker.check_model(body.model)
        tok = worker.engine.tokenizer
        if isinstance(body, TokenizeChatRequest):
            tokens = await asyncio.to_thread(tok.apply_chat_template, chat_messages(body.messages))
        else:
            tokens = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), tokens=tokens,
                                max_model_len=worker.engine.limits.max_model_len)  # fmt: skip

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        worker.check_model(body.model)
        worker.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(worker.engine.tokenizer.decode,
                                                                 body.tokens))  # fmt: skip

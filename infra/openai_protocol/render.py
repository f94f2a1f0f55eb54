"""A stream of instance chunks rendered as an OpenAI response: SSE events
ending in one ``data: [DONE]``, or one whole JSON body."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from fastapi import Response

from infra.contract import ChunkBatch, GenerateChunk, TokenLogprob
from infra.errors import ErrorDetail, ServiceUnavailableError
from infra.http import line_safe_json
from infra.openai_protocol.models import Usage
from infra.openai_protocol.translate import (
    chat_chunk,
    chat_usage_chunk,
    chat_whole,
    completion_chunk,
    completion_usage_chunk,
    completion_whole,
    running_usage,
    usage_of,
)

log = logging.getLogger(__name__)


class StreamBroken(Exception):
    """The instance failed after tokens reached the client."""


class Call(Protocol):
    """One OpenAI call being answered: what it is, and hooks that see it through."""

    rid: str
    created: int
    model: str
    chat: bool
    include_usage: bool
    continuous_usage: bool
    """Every chunk carries the usage so far (vLLM's ``continuous_usage_stats``)."""

    def observe(self, chunk: GenerateChunk) -> None:
        """Called for every chunk, before it is rendered."""

    async def charge(self, usage: Usage | None) -> None:
        """Called once with the final usage, before the response completes."""

    def done(self, status: str) -> None:
        """Called exactly once when the call ends: ok, broken or disconnected."""


def _sse(payload: str) -> bytes:
    return f"data: {line_safe_json(payload)}\n\n".encode()


async def sse_events(
    call: Call, first: ChunkBatch, batches: AsyncGenerator[ChunkBatch, None]
) -> AsyncIterator[bytes]:
    """SSE events for ``first`` and the rest of ``batches``, one write per
    batch; a failure after the first token ends the stream with an
    OpenAI-format error event."""
    usage: Usage | None = None
    status = "ok"
    try:
        batch: ChunkBatch | None = first
        is_first = True
        offset = 0  # of the next token's text, for completions' logprobs
        while batch is not None:
            events: list[bytes] = []
            broken: str | None = None
            for chunk in batch:
                call.observe(chunk)
                usage = usage_of(chunk) or usage
                if chunk.error is not None:
                    broken = chunk.error.message
                    break
                body = (
                    chat_chunk(call.rid, call.created, call.model, chunk, is_first)
                    if call.chat
                    else completion_chunk(call.rid, call.created, call.model, chunk, offset)
                )
                offset += sum(len(e.token) for e in chunk.logprobs or ())
                if call.continuous_usage:
                    body.usage = running_usage(chunk)
                events.append(_sse(body.model_dump_json()))
                is_first = False
            if events:
                yield b"".join(events)
            if broken is not None:
                raise StreamBroken(broken)
            batch = await anext(batches, None)
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
        await batches.aclose()
        call.done(status)
    yield _sse("[DONE]")


async def whole_response(
    call: Call, first: ChunkBatch, batches: AsyncGenerator[ChunkBatch, None]
) -> Response:
    """One complete response body once the request has finished."""
    texts: list[str] = []
    logprobs: list[TokenLogprob] | None = None
    finish: str | None = None
    usage: Usage | None = None
    try:
        batch: ChunkBatch | None = first
        while batch is not None:
            for chunk in batch:
                call.observe(chunk)
                if chunk.error is not None:
                    raise StreamBroken(chunk.error.message)
                texts.append(chunk.text)
                if chunk.logprobs is not None:
                    logprobs = [*(logprobs or []), *chunk.logprobs]
                finish = chunk.finish_reason or finish
                usage = usage_of(chunk) or usage
            batch = await anext(batches, None)
    except StreamBroken as exc:
        call.done("broken")
        raise ServiceUnavailableError(f"the instance failed mid-request: {exc}") from exc
    finally:
        await batches.aclose()
    if usage is None:
        call.done("broken")
        raise ServiceUnavailableError("the instance ended the request without usage")
    await call.charge(usage)
    call.done("ok")
    make = chat_whole if call.chat else completion_whole
    body = make(call.rid, call.created, call.model, "".join(texts), finish, usage, logprobs)
    return Response(body.model_dump_json(), media_type="application/json")

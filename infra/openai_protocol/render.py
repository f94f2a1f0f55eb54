"""A stream of instance chunks rendered as an OpenAI response: SSE events
ending in one ``data: [DONE]``, or one whole JSON body."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from fastapi import Response

from infra.contract import GenerateChunk
from infra.errors import ErrorDetail, ServiceUnavailableError
from infra.http import line_safe_json
from infra.openai_protocol.choices import ChoiceBatch
from infra.openai_protocol.models import ChatCompletionChunk, Completion, Usage
from infra.openai_protocol.translate import (
    BestOf,
    WholeChoice,
    chat_chunk,
    chat_usage_chunk,
    chat_whole,
    completion_chunk,
    completion_usage_chunk,
    completion_whole,
    openai_usage,
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
    echo: str | None
    """The prompt, put before each choice's text (None: no echo)."""
    best_of: BestOf | None
    """Which of the samples a whole response returns (None: all)."""

    def observe(self, chunk: GenerateChunk) -> None:
        """Called for every chunk, before it is rendered."""

    async def charge(self, usage: Usage | None) -> None:
        """Called once with the final usage, before the response completes."""

    def done(self, status: str) -> None:
        """Called exactly once when the call ends: ok, broken or disconnected."""


def _text(body: ChatCompletionChunk | Completion) -> str:
    if isinstance(body, Completion):
        return body.choices[0].text
    return body.choices[0].delta.content or ""


def _sse(payload: str) -> bytes:
    return f"data: {line_safe_json(payload)}\n\n".encode()


def total_usage(usages: dict[int, Usage]) -> Usage | None:
    """The call's usage over its choices: the prompt once, every choice's
    output (vLLM's count for ``n`` > 1); None until every choice has one."""
    if not usages:
        return None
    prompt = next(iter(usages.values())).prompt_tokens
    completion = sum(u.completion_tokens for u in usages.values())
    details = [u.completion_tokens_details for u in usages.values()]
    reasoning = sum(d.reasoning_tokens for d in details if d) if any(details) else None
    return openai_usage(prompt, completion, reasoning)


async def sse_events(
    call: Call, first: ChoiceBatch, batches: AsyncGenerator[ChoiceBatch, None]
) -> AsyncIterator[bytes]:
    """SSE events for ``first`` and the rest of ``batches``, one write per
    batch; a failure after the first token ends the stream with an
    OpenAI-format error event."""
    usages: dict[int, Usage] = {}
    status = "ok"
    try:
        batch: ChoiceBatch | None = first
        started: set[int] = set()  # choices whose first delta (with the role) is out
        offsets: dict[int, int] = {}  # of each choice's text so far, for logprobs
        while batch is not None:
            events: list[bytes] = []
            broken: str | None = None
            for index, chunk in batch:
                call.observe(chunk)
                if (u := usage_of(chunk)) is not None:
                    usages[index] = u
                if chunk.error is not None:
                    broken = chunk.error.message
                    break
                offset = offsets.get(index, 0)
                body = (
                    chat_chunk(call.rid, call.created, call.model, chunk, index not in started,
                               index)
                    if call.chat
                    else completion_chunk(call.rid, call.created, call.model, chunk, offset,
                                          index, call.echo if index not in started else None)
                )  # fmt: skip
                offsets[index] = offset + len(_text(body))  # vLLM's: offsets count text
                if call.continuous_usage:
                    body.usage = running_usage(chunk)
                events.append(_sse(body.model_dump_json()))
                started.add(index)
            if events:
                yield b"".join(events)
            if broken is not None:
                raise StreamBroken(broken)
            batch = await anext(batches, None)
        usage = total_usage(usages)
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
    call: Call, first: ChoiceBatch, batches: AsyncGenerator[ChoiceBatch, None]
) -> Response:
    """One complete response body once the request has finished."""
    choices: dict[int, WholeChoice] = {}
    usages: dict[int, Usage] = {}
    try:
        batch: ChoiceBatch | None = first
        while batch is not None:
            for index, chunk in batch:
                call.observe(chunk)
                if chunk.error is not None:
                    raise StreamBroken(chunk.error.message)
                choices.setdefault(index, WholeChoice(index)).add(chunk)
                if (u := usage_of(chunk)) is not None:
                    usages[index] = u
            batch = await anext(batches, None)
    except StreamBroken as exc:
        call.done("broken")
        raise ServiceUnavailableError(f"the instance failed mid-request: {exc}") from exc
    finally:
        await batches.aclose()
    usage = total_usage(usages)
    if usage is None or len(usages) < len(choices):
        call.done("broken")
        raise ServiceUnavailableError("the instance ended the request without usage")
    await call.charge(usage)
    call.done("ok")
    ordered = [choices[i] for i in sorted(choices)]
    if call.best_of is not None:
        ordered = call.best_of.pick(ordered)
    body = (
        chat_whole(call.rid, call.created, call.model, ordered, usage)
        if call.chat
        else completion_whole(call.rid, call.created, call.model, ordered, usage, call.echo)
    )
    return Response(body.model_dump_json(), media_type="application/json")

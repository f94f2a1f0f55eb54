"""``n`` choices of one OpenAI call: ``n`` independent instance requests whose
chunk streams are merged, each chunk tagged with its choice's index.

vLLM serves ``n`` > 1 the same way (its ``ParentRequest`` fans out ``n``
child requests, child ``i`` seeded ``seed + i``), so a seeded call gives the
same choices here as on ``vllm serve``. Because each choice is a request of
its own, each is dispatched, live-migrated and replayed on its own like any
other request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence

from infra.contract import ChunkBatch, GenerateChunk, GenerateRequest

Choice = tuple[int, GenerateChunk]
"""A chunk of the choice at this index."""
ChoiceBatch = list[Choice]
"""Chunks (of one or more choices) that arrived together."""
Open = Callable[[GenerateRequest], AsyncGenerator[ChunkBatch, None]]
"""Runs one instance request, yielding its chunk batches."""


def choice_requests(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The ``n`` requests of a call: the request itself for one choice; else
    copies with ids ``<id>-<i>`` and, when seeded, seeds ``seed + i`` (vLLM's)."""
    if n == 1:
        return [request]
    assert request.request_id is not None
    return [request.model_copy(update={
        "request_id": f"{request.request_id}-{i}",
        "seed": None if request.seed is None else request.seed + i,
    }) for i in range(n)]  # fmt: skip


async def open_choices(
    open_one: Open, requests: list[GenerateRequest]
) -> tuple[ChoiceBatch, AsyncGenerator[ChoiceBatch, None]]:
    """The first batch of every choice (so a refusal surfaces before the
    response starts), and the merged rest. Each choice's stream is closed
    when the merged stream is, or when another choice fails."""
    streams = [open_one(r) for r in requests]
    tasks = [asyncio.ensure_future(anext(s, None)) for s in streams]
    try:
        firsts = await asyncio.gather(*tasks)
    except BaseException:
        await _cancel(tasks)
        await _close_all(streams)
        raise
    first: ChoiceBatch = [(i, c) for i, batch in enumerate(firsts) for c in batch or ()]
    if len(streams) == 1:
        return first, _single(streams[0])
    live = [i for i, batch in enumerate(firsts) if batch is not None]
    return first, _merged(streams, live)


async def _single(stream: AsyncGenerator[ChunkBatch, None]) -> AsyncGenerator[ChoiceBatch, None]:
    try:
        async for batch in stream:
            yield [(0, c) for c in batch]
    finally:
        await stream.aclose()


async def _merged(
    streams: list[AsyncGenerator[ChunkBatch, None]], live: list[int]
) -> AsyncGenerator[ChoiceBatch, None]:
    """Batches of the ``live`` streams, in the order they arrive."""
    pending = {asyncio.ensure_future(anext(streams[i], None)): i for i in live}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                batch = task.result()  # a failure of one choice ends the call
                if batch is None:
                    continue
                yield [(i, c) for c in batch]
                pending[asyncio.ensure_future(anext(streams[i], None))] = i
    finally:
        await _cancel(list(pending))
        await _close_all(streams)


async def _cancel(tasks: Sequence[asyncio.Future[ChunkBatch | None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def _close_all(streams: list[AsyncGenerator[ChunkBatch, None]]) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()

"""NDJSON streaming of instance chunks (``/generate`` and ``/resume``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from infra.errors import ErrorDetail
from instance.api import GenerateChunk

log = logging.getLogger(__name__)

NDJSON_MEDIA_TYPE = "application/x-ndjson"


async def ndjson(
    request_id: str, chunks: AsyncGenerator[GenerateChunk, None]
) -> AsyncIterator[bytes]:
    """Stream chunks as NDJSON. A client that goes away cancels this generator,
    whose ``finally`` aborts the request in the engine."""
    try:
        async for chunk in chunks:
            yield chunk.model_dump_json(exclude_none=True).encode() + b"\n"
    except Exception as exc:
        log.exception("request %s failed mid-stream", request_id)
        err = GenerateChunk(
            request_id=request_id,
            finish_reason="error",
            error=ErrorDetail(message=f"engine error: {exc}", type="engine_error"),
        )
        yield err.model_dump_json(exclude_none=True).encode() + b"\n"
    finally:
        await chunks.aclose()

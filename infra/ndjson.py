"""NDJSON streaming of instance chunks (``/generate`` and ``/resume``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from infra.contract import GenerateChunk
from infra.errors import ErrorDetail
from infra.http import line_safe_json

log = logging.getLogger(__name__)

NDJSON_MEDIA_TYPE = "application/x-ndjson"


def ndjson_line(chunk: GenerateChunk) -> bytes:
    """One NDJSON line, whole for any line-splitting client."""
    return line_safe_json(chunk.model_dump_json(exclude_none=True)).encode() + b"\n"


async def ndjson(
    request_id: str, chunks: AsyncGenerator[GenerateChunk, None]
) -> AsyncIterator[bytes]:
    """Stream chunks as NDJSON. A client that goes away cancels this generator,
    whose ``finally`` aborts the request in the engine."""
    try:
        async for chunk in chunks:
            yield ndjson_line(chunk)
    except Exception as exc:
        log.exception("request %s failed mid-stream", request_id)
        err = GenerateChunk(
            request_id=request_id,
            finish_reason="error",
            error=ErrorDetail(message=f"engine error: {exc}", type="engine_error"),
        )
        yield ndjson_line(err)
    finally:
        await chunks.aclose()

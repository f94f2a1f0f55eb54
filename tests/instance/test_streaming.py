"""NDJSON framing of instance streams."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx

from infra.contract import GenerateChunk
from infra.ndjson import ndjson

# Line breaks to str.splitlines, which httpx's iter_lines follows: JSON escapes
# the control characters but leaves U+0085, U+2028 and U+2029 as they are.
TEXTS = ["a\u2028b", "\x85", "c\u2029d", "\x0b\x0c\x1c\x1d\x1e\r\n", "plain"]


async def test_a_line_splitting_client_gets_every_chunk_whole() -> None:
    """A byte-level tokenizer's text can hold any character (vLLM's first delta
    after a prompt of random tokens carried ~10,000 characters of prompt
    bytes, one of them U+0085): httpx's iter_lines cut that line in two and
    the client gave the request up."""

    async def chunks() -> AsyncGenerator[GenerateChunk, None]:
        for i, text in enumerate(TEXTS):
            yield GenerateChunk(request_id="r", token_ids=[i], text=text)

    body = b"".join([line async for line in ndjson("r", chunks())])
    lines = list(httpx.Response(200, content=body).iter_lines())
    assert [GenerateChunk.model_validate_json(line).text for line in lines] == TEXTS
    # The gateway splits on b"\n" only: the same chunks.
    by_newline = [GenerateChunk.model_validate_json(line) for line in body.splitlines()]
    assert [c.text for c in by_newline] == TEXTS

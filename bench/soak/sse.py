"""The client side of an OpenAI streaming response, line by line, into a
:class:`StreamResult`. Pure, so the parsing of chat and completion chunks,
usage records, error events and ``[DONE]`` is tested without a server."""

from __future__ import annotations

import json
from typing import Any

from bench.soak.accounting import StreamResult, Usage


def feed_line(result: StreamResult, line: str) -> None:
    """Apply one SSE line (``data: ...``; blank lines and comments are
    skipped). Anything after ``[DONE]`` is an error: the stream had ended."""
    line = line.strip()
    if not line.startswith("data:"):
        return
    payload = line[len("data:") :].strip()
    if result.done:
        result.errors.append(f"data after [DONE]: {payload[:200]}")
        return
    if payload == "[DONE]":
        result.done = True
        return
    try:
        event = json.loads(payload)
    except ValueError:
        result.errors.append(f"malformed event: {payload[:200]}")
        return
    _apply(result, event)


def _apply(result: StreamResult, event: Any) -> None:
    if not isinstance(event, dict):
        result.errors.append(f"unexpected event: {str(event)[:200]}")
        return
    if "error" in event:
        err = event["error"]
        message = err.get("message") if isinstance(err, dict) else err
        result.errors.append(str(message))
        return
    result.request_id = result.request_id or event.get("id")
    if event.get("usage"):
        result.usage = Usage.from_json(event["usage"])
    for choice in event.get("choices") or []:
        delta = choice.get("delta")
        piece = (delta or {}).get("content") if delta is not None else choice.get("text")
        result.text += piece or ""
        if choice.get("finish_reason") is not None:
            result.finish_reason = choice["finish_reason"]

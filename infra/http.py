"""HTTP plumbing shared by Shoal's servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra.cluster_auth import CLUSTER_HEADER, ClusterKeys, Purpose
from infra.errors import AuthenticationError, PayloadTooLargeError, ShoalError

T = TypeVar("T")

_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
"""Line breaks to ``str.splitlines`` (which httpx's ``iter_lines`` follows)
that JSON leaves unescaped; the other ones are control characters, which JSON
escapes anyway."""


def line_safe_json(text: str) -> str:
    """JSON text that no line-splitting client cuts in two: generated text can
    hold any character (a byte-level tokenizer's first delta can carry
    thousands of characters of prompt bytes), so U+0085/U+2028/U+2029 are
    escaped. Still valid JSON decoding to the same value."""
    for char, escaped in _LINE_BREAKS.items():
        if char in text:
            text = text.replace(char, escaped)
    return text


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with a 413, whether the
    size is announced in ``Content-Length`` or only discovered while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        err = PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes")
        await _send_error(send, 413, err)


async def _send_error(send: Send, status: int, err: ShoalError) -> None:
    body = json.dumps(err.body().model_dump()).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


_DIRECT = "shoal_direct"


def is_direct(request: Request) -> bool:
    """Whether the call came without the cluster credential, let in by
    :class:`ClusterAuthMiddleware`'s ``direct_prefixes`` (not from the
    control plane: it gets no more than ``normal`` priority)."""
    return bool(request.scope.get("state", {}).get(_DIRECT))


class ClusterAuthMiddleware:
    """Refuse calls without the cluster credential (:mod:`infra.cluster_auth`)
    with an OpenAI-format 401, but for the paths in ``open_paths`` (probes
    and metrics) and those starting with one of ``direct_prefixes`` (let in
    for debugging, marked as *direct*: see :func:`is_direct`); ``on_refused``
    is told each refused path."""

    def __init__(self, app: ASGIApp, keys: ClusterKeys, open_paths: frozenset[str],
                 on_refused: Callable[[str], None],
                 direct_prefixes: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.app = app
        self.keys = keys
        self.open_paths = open_paths
        self.on_refused = on_refused
        self.direct_prefixes = direct_prefixes
        self._header = CLUSTER_HEADER.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.keys.is_open or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = next((v for k, v in scope.get("headers", ()) if k == self._header), None)
        if self.keys.accepts(token.decode("latin-1") if token else None, Purpose.HTTP):
            await self.app(scope, receive, send)
            return
        if self.direct_prefixes and scope["path"].startswith(self.direct_prefixes):
            scope.setdefault("state", {})[_DIRECT] = True
            await self.app(scope, receive, send)
            return
        self.on_refused(scope["path"])
        err = AuthenticationError(
            "this is an internal surface of a Shoal cluster: calls need the cluster credential "
            f"({CLUSTER_HEADER}); clients go through the gateway",
            code="cluster_credential",
        )
        await _send_error(send, 401, err)


DISCONNECT_POLL_S = 0.2


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``, cancelling it (and returning ``None``) as soon as the
    client of ``request`` disconnects; checked every 200 ms."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""The KV transfer wire: framed messages over TCP between the KV connectors
of two instances, and between an instance worker and its own connector.

A frame is a 4-byte big-endian header length, a JSON header, then
``header["nbytes"]`` bytes of payload (raw KV blocks) if any. Every request
gets exactly one reply frame; ``{"ok": false, "error": ...}`` on failure.
Blocking sockets on purpose: the connector serves from plain threads inside
vLLM's worker process, and the worker calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

TRANSFER_KEY = "shoal_migration"
"""Key in a vLLM request's ``kv_transfer_params``: ``{"key", "num_tokens"}``."""

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20


class WireError(Exception):
    """The peer refused the request or the connection failed."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps({**header, "nbytes": len(payload)}).encode()
    sock.sendall(_LEN.pack(len(head)) + head)
    if payload:
        sock.sendall(payload)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > MAX_HEADER_BYTES:
        raise ConnectionError(f"frame header of {length} bytes")
    header: dict[str, Any] = json.loads(_recv_exact(sock, length))
    nbytes = int(header.get("nbytes", 0))
    return header, _recv_exact(sock, nbytes) if nbytes else b""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, _, port = text.rpartition(":")
        return cls(host or "127.0.0.1", int(port))


def call(
    endpoint: Endpoint, op: str, timeout_s: float = 30.0, **fields: Any
) -> tuple[dict[str, Any], bytes]:
    """One request/reply exchange on a fresh connection."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_frame(sock, {"op": op, **fields})
            header, payload = recv_frame(sock)
    except OSError as exc:
        raise WireError(f"{op} to {endpoint}: {exc}") from exc
    if not header.get("ok", False):
        raise WireError(f"{op} to {endpoint}: {header.get('error', 'refused')}")
    return header, payload

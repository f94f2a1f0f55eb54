"""The KV transfer wire: framed messages over TCP between the KV connectors
of two instances, and between an instance worker and its own connector.

A frame is a 4-byte big-endian header length, a JSON header, then
``nbytes`` bytes of payload (raw KV blocks) if any. A payload is sent from
memoryviews of the sender's buffer and received with ``recv_into`` into the
receiver's, so KV bytes are never copied into Python objects. The header is a typed
message: a request (one of :data:`WireRequest`, told apart by ``op``) or a
reply (:class:`Reply` and its kinds); every request gets exactly one reply
frame, ``ok: false`` with an ``error`` on failure. Blocking sockets on
purpose: the connector serves from plain threads inside vLLM's worker
process, and the worker calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hmac
import json
import socket
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, TypeAdapter

from infra.cluster_auth import ClusterKeys, Purpose
from infra.tls import PLAIN, ClusterTls
from migration.kv_layout import KvLayout
from migration.ports import KvStatus

TRANSFER_KEY = "shoal_migration"
"""Key in a vLLM request's ``kv_transfer_params``: ``{"key", "num_tokens"}``."""

_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20


class WireError(Exception):
    """The peer refused the request or the connection failed."""


# -- messages --------------------------------------------------------------------
class ReadBlocks(BaseModel):
    """Source side: send blocks ``[first, first + count)`` of a running request."""

    op: Literal["read"] = "read"
    request_id: str
    """The engine's id of the request on the source."""
    first: int = Field(ge=0)
    count: int = Field(ge=1)
    grant: str = ""
    """The migration's read grant (:class:`Grant`): only its holder reads."""


class StageBlocks(BaseModel):
    """Destination side: pull those blocks from ``source`` into staging under ``key``."""

    op: Literal["stage"] = "stage"
    key: str
    source: str
    """``host:port`` of the source's KV endpoint."""
    request_id: str
    first: int = Field(ge=0)
    count: int = Field(ge=1)
    grant: str = ""
    """The read grant the source issued for this migration."""


class Grant(BaseModel):
    """Source side: let reads of the request's blocks that carry ``token``
    (one migration's destination) through, until revoked."""

    op: Literal["grant"] = "grant"
    request_id: str
    token: str = Field(min_length=16)


class Revoke(BaseModel):
    op: Literal["revoke"] = "revoke"
    request_id: str


class Pin(BaseModel):
    """Keep the request's blocks after it is stopped, until unpinned."""

    op: Literal["pin"] = "pin"
    request_id: str


class Unpin(BaseModel):
    op: Literal["unpin"] = "unpin"
    request_id: str


class Drop(BaseModel):
    """Forget what is staged under ``key``."""

    op: Literal["drop"] = "drop"
    key: str


class GetStatus(BaseModel):
    op: Literal["status"] = "status"


WireRequest = Annotated[
    ReadBlocks | StageBlocks | Grant | Revoke | Pin | Unpin | Drop | GetStatus,
    Field(discriminator="op"),
]
_REQUEST: TypeAdapter[WireRequest] = TypeAdapter(WireRequest)


class Reply(BaseModel):
    ok: bool = True
    error: str | None = None


class BlocksRead(Reply):
    """The header of a stage's blocks: ``count`` blocks from logical block
    ``first`` of ``request_id``, every layer's in one payload laid out as
    ``layout`` says (:mod:`migration.kv_blocks`)."""

    count: int
    bytes: int
    """Bytes of KV (the sim engine's carry none: its blocks are modelled)."""
    request_id: str = ""
    first: int = 0
    block_ids: list[int] = Field(default_factory=list)
    """The source's block ids the payload was gathered from."""
    layout: KvLayout | None = None
    """Every layer's block shape, block dimension and dtype (None: sim)."""
    segment: str | None = None
    """The payload is in this shared-memory segment instead of the frame
    (``shm`` transport, same host): the receiver maps it, then unlinks it."""


class BlocksStaged(Reply):
    blocks: int
    bytes: int


class StatusReply(Reply, KvStatus):
    tables: int = 0
    """Requests whose block tables the connector tracks."""


R = TypeVar("R", bound=Reply)


def refusal(error: str) -> Reply:
    return Reply(ok=False, error=error)


def encode(message: BaseModel, nbytes: int = 0, auth: str | None = None) -> bytes:
    """A frame's length prefix and header; ``auth``: the cluster credential
    of a request (:mod:`infra.cluster_auth`, purpose ``kv``)."""
    fields = {**message.model_dump(mode="json"), "nbytes": nbytes}
    if auth is not None:
        fields["auth"] = auth
    head = json.dumps(fields).encode()
    return _LEN.pack(len(head)) + head


def decode_header(raw: bytes) -> tuple[dict[str, Any], int]:
    """A frame's header fields and its payload size."""
    header: dict[str, Any] = json.loads(raw)
    return header, int(header.pop("nbytes", 0))


def parse_request(header: dict[str, Any]) -> WireRequest:
    return _REQUEST.validate_python(header)


def authenticated(header: dict[str, Any], keys: ClusterKeys) -> bool:
    """Whether a request frame carries the cluster's KV credential (taken
    out of the header); a server closes the connection of one that does not."""
    auth = header.pop("auth", None)
    return keys.accepts(auth if isinstance(auth, str) else None, Purpose.KV)


UNAUTHENTICATED = "unauthenticated: the KV port serves members of the cluster only"
NOT_GRANTED = "not granted: the request's blocks go only to its migration's destination"


class Grants:
    """The read grants of a source's KV port: a request's blocks are read
    only with the token its current migration issued (thread-safe callers
    hold their own lock)."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self.refused = 0
        """Reads refused for want of the grant, in total."""

    def grant(self, request_id: str, token: str) -> None:
        self._tokens[request_id] = token

    def revoke(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)

    def allows(self, read: ReadBlocks) -> bool:
        """Whether ``read`` carries its request's grant; counts a refusal."""
        token = self._tokens.get(read.request_id)
        if token is not None and hmac.compare_digest(token.encode(), read.grant.encode()):
            return True
        self.refused += 1
        return False

    @property
    def granted(self) -> list[str]:
        return sorted(self._tokens)


def parse_reply(header: dict[str, Any], kind: type[R], what: str) -> R:
    """The reply as ``kind``, or :class:`WireError` if the peer refused."""
    if not header.get("ok", False):
        raise WireError(f"{what}: {header.get('error', 'refused')}")
    return kind.model_validate(header)


# -- blocking sockets --------------------------------------------------------------
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


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (the payload lands in the caller's buffer)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def send_frame(sock: socket.socket, message: BaseModel, payload: bytes | memoryview = b"",
               nbytes: int | None = None, auth: str | None = None) -> None:  # fmt: skip
    """Send a frame; ``nbytes`` announces a payload the caller sends itself."""
    size = len(payload) if nbytes is None else nbytes
    sock.sendall(encode(message, size, auth))
    if payload:
        sock.sendall(payload)


def recv_header(sock: socket.socket) -> tuple[dict[str, Any], int]:
    """A frame's header and the size of the payload that follows it."""
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > MAX_HEADER_BYTES:
        raise ConnectionError(f"frame header of {length} bytes")
    return decode_header(_recv_exact(sock, length))


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    header, nbytes = recv_header(sock)
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


def connect(endpoint: Endpoint, tls: ClusterTls, timeout_s: float = 30.0) -> socket.socket:
    """A connection to a KV port, over TLS when the cluster speaks it."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return tls.wrap_client(sock, endpoint.host)
    except BaseException:
        sock.close()
        raise


def call(
    endpoint: Endpoint, request: BaseModel, reply: type[R], timeout_s: float = 30.0,
    auth: str | None = None, tls: ClusterTls = PLAIN,
) -> tuple[R, bytes]:  # fmt: skip
    """One request/reply exchange on a fresh connection."""
    what = f"{getattr(request, 'op', '?')} to {endpoint}"
    try:
        with connect(endpoint, tls, timeout_s) as sock:
            send_frame(sock, request, auth=auth)
            header, payload = recv_frame(sock)
    except OSError as exc:
        raise WireError(f"{what}: {exc}") from exc
    return parse_reply(header, reply, what), payload

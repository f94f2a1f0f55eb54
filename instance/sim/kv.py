"""KV transfer for the sim engine: the migration state machine of the real
connector (``migration/kv_connector.py``) over a simulated cache, with the
transfer time taken from a bandwidth model.

There are no KV tensors in the sim, so nothing but sizes crosses the wire:

* the source serves ``read`` requests over TCP with the frame format of
  :mod:`migration.wire`. A read of blocks ``[first, first + count)`` of a
  request succeeds if the request holds its KV here (running, or stopped but
  pinned) and those blocks are full (``first + count <= (num_tokens - 1) //
  block_size``, as only full blocks move); the reply carries the byte count,
  not the bytes;
* the destination's :meth:`SimKvPort.stage` reads from the source, then waits
  the modelled transfer time ``latency_s + bytes / bandwidth_bytes_per_s``
  through an injected ``sleep`` (wall time in a worker, a virtual clock in a
  simulator), then records the blocks as staged in its :class:`SimCore`;
* a request added with ``kv_transfer`` loads the staged blocks when admitted
  (its prefill skips them); pins keep an aborted request's blocks, counted as
  used, until unpinned or until the pin expires (``pin_ttl_s``, like the
  connector's ``PIN_TTL_S``).

Everything runs on the engine's event loop, so the core needs no locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from infra.cluster_auth import ClusterKeys, Purpose
from infra.tls import PLAIN, ClusterTls
from instance.sim.core import SimCore
from migration.ports import KvStatus
from migration.wire import (
    MAX_HEADER_BYTES,
    NOT_GRANTED,
    UNAUTHENTICATED,
    BlocksRead,
    Endpoint,
    Grants,
    ReadBlocks,
    Reply,
    WireError,
    authenticated,
    decode_header,
    encode,
    parse_reply,
    parse_request,
    refusal,
)

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

PIN_TTL_S = 60.0
"""A pin not released within this long is dropped (as in the real connector)."""

LLAMA_7B_FP16_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2
"""K and V, 32 layers, hidden size 4096, 2 bytes (fp16): 512 KiB per token,
so 8 MiB per block of 16 tokens (the model the sim's latency defaults follow)."""

_LEN = struct.Struct(">I")
"""Frame header length prefix, as in :mod:`migration.wire`."""


@dataclass(frozen=True)
class KvTransferModel:
    """Time to move KV between two sim instances.

    One stage (one read of ``count`` blocks) takes
    ``latency_s + bytes / bandwidth_bytes_per_s`` with
    ``bytes = count * block_size * bytes_per_token``.

    Defaults: LLaMA-7B in fp16 (see :data:`LLAMA_7B_FP16_BYTES_PER_TOKEN`),
    and 10 Gbit/s of TCP between hosts (a common datacenter NIC; the real
    connector also moves blocks over plain TCP), with 1 ms fixed cost per
    stage (connection set-up, a few datacenter round trips and the
    device-to-host copy launch). A 1,000-token context is 62 full blocks,
    520 MB, about 0.42 s to copy at that rate."""

    bytes_per_token: int = LLAMA_7B_FP16_BYTES_PER_TOKEN
    bandwidth_bytes_per_s: float = 10e9 / 8
    latency_s: float = 0.001

    def __post_init__(self) -> None:
        if self.bytes_per_token < 1 or self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"invalid KvTransferModel: {self}")

    def transfer_s(self, num_bytes: int) -> float:
        """Modelled seconds to move ``num_bytes`` in one stage."""
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s

    def scaled(self, speedup: float) -> KvTransferModel:
        """The same link ``speedup`` times faster (with a sped-up sim engine)."""
        return KvTransferModel(
            bytes_per_token=self.bytes_per_token,
            bandwidth_bytes_per_s=self.bandwidth_bytes_per_s * speedup,
            latency_s=self.latency_s / speedup,
        )


@dataclass(frozen=True)
class SimKvOptions:
    """How a sim engine exposes its KV port."""

    endpoint: str
    """``host:port`` peers read from; port 0 binds a free port (known after start)."""
    model: KvTransferModel = field(default_factory=KvTransferModel)
    """Modelled time of a transfer."""
    listen_host: str | None = None
    """Interface to bind; defaults to the endpoint's host."""
    pin_ttl_s: float = PIN_TTL_S
    """A pin its migration never releases is dropped after this long (the peer is gone)."""
    keys: ClusterKeys = field(default_factory=ClusterKeys.open)
    """Who may read: peers with the cluster's KV credential."""
    tls: ClusterTls = PLAIN
    """How the port serves and reads from its peers: TLS or plain TCP."""


class SimKvPort:
    """:class:`instance.engine.KvPort` of a sim engine (see module doc)."""

    def __init__(
        self,
        core: SimCore,
        options: SimKvOptions,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.options = options
        self.model = options.model
        self._endpoint = Endpoint.parse(options.endpoint)
        self._sleep = sleep
        self._clock = clock
        self._pinned_at: dict[str, float] = {}
        self._grants = Grants()
        self._server: asyncio.Server | None = None
        self._refused = 0
        self._reaper: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return str(self._endpoint)

    @property
    def block_bytes(self) -> int:
        return self.model.bytes_per_token * self.core.config.block_size

    # -- lifecycle (with the engine) ----------------------------------------
    async def start(self) -> None:
        host = self.options.listen_host or self._endpoint.host
        tls = self.options.tls.server_context()
        self._server = await asyncio.start_server(self._serve, host, self._endpoint.port, ssl=tls)
        if self._endpoint.port == 0:
            port = int(self._server.sockets[0].getsockname()[1])
            self._endpoint = Endpoint(self._endpoint.host, port)
        self._reaper = asyncio.create_task(self._expire_pins(), name="sim-kv-pins")
        log.info("sim KV port serving on %s", self._endpoint)

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _expire_pins(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.options.pin_ttl_s))
            self.expire_pins()

    def expire_pins(self) -> None:
        """Release pins older than the TTL (their peer is gone)."""
        now = self._clock()
        for request_id, since in list(self._pinned_at.items()):
            if now - since > self.options.pin_ttl_s:
                log.warning("pin on %s expired: releasing its blocks", request_id)
                self.core.unpin(request_id)
                del self._pinned_at[request_id]

    # -- KvPort -------------------------------------------------------------
    async def stage(
        self, key: str, source: str, request_id: str, first: int, count: int, grant: str
    ) -> int:
        read = ReadBlocks(request_id=request_id, first=first, count=count, grant=grant)
        auth = self.options.keys.token(Purpose.KV)
        num_bytes = (await _call(Endpoint.parse(source), read, auth, self.options.tls)).bytes
        if num_bytes != count * self.block_bytes:
            raise WireError(f"got {num_bytes} bytes for {count} blocks of {self.block_bytes} "
                            "(the instances model different KV sizes)")  # fmt: skip
        await self._sleep(self.model.transfer_s(num_bytes))
        self.core.stage(key, first, count)
        return num_bytes

    async def drop(self, key: str) -> None:
        self.core.drop(key)

    async def grant(self, request_id: str, token: str) -> None:
        self._grants.grant(request_id, token)

    async def revoke(self, request_id: str) -> None:
        self._grants.revoke(request_id)

    async def pin(self, request_id: str) -> None:
        self._pinned_at[request_id] = self._clock()
        self.core.pin(request_id)

    async def unpin(self, request_id: str) -> None:
        self._pinned_at.pop(request_id, None)
        self.core.unpin(request_id)

    async def status(self) -> KvStatus:
        return KvStatus(pinned=self.core.pinned, delayed=self.core.held,
                        staging=self.core.staging, block_bytes=self.block_bytes,
                        loaded_blocks=self.core.num_loaded_blocks_total,
                        unauthenticated=self._refused, granted=self._grants.granted,
                        not_granted=self._grants.refused)  # fmt: skip

    # -- the wire (source side) ---------------------------------------------
    def read(self, request: ReadBlocks) -> Reply:
        """Answer a peer's read of blocks ``[first, first + count)``."""
        first, count = request.first, request.count
        if not self._grants.allows(request):
            log.warning("sim KV port: refused a read of %s without its migration's grant",
                        request.request_id)  # fmt: skip
            return refusal(NOT_GRANTED)
        full = self.core.num_full_blocks(request.request_id)
        if full is None:
            return refusal(f"{request.request_id} holds no KV here")
        if first + count > full:
            return refusal(f"{request.request_id} has {full} full blocks, "
                           f"asked for {first}+{count}")  # fmt: skip
        return BlocksRead(count=count, bytes=count * self.block_bytes)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await _recv(reader)
            if not authenticated(header, self.options.keys):
                log.warning("sim KV port: refused a connection without the cluster credential")
                self._refused += 1
                await _send(writer, refusal(UNAUTHENTICATED))
                return
            try:
                request = parse_request(header)
                if not isinstance(request, ReadBlocks):
                    raise ValueError(f"the sim serves reads only, not {request.op!r}")
                reply = self.read(request)
            except Exception as exc:  # a bad request must not kill the server
                log.debug("sim KV request %s failed: %s", header, exc)
                reply = refusal(f"{type(exc).__name__}: {exc}")
            await _send(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            log.debug("sim KV connection dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, message: BaseModel, auth: str | None = None) -> None:
    writer.write(encode(message, auth=auth))
    await writer.drain()


async def _recv(reader: asyncio.StreamReader) -> dict[str, Any]:
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > MAX_HEADER_BYTES:
        raise ConnectionError(f"frame header of {length} bytes")
    header, nbytes = decode_header(await reader.readexactly(length))
    if nbytes:  # the sim's frames carry none; a peer's are read and ignored
        await reader.readexactly(nbytes)
    return header


async def _call(endpoint: Endpoint, request: ReadBlocks, auth: str | None, tls: ClusterTls,
                timeout_s: float = 30.0) -> BlocksRead:  # fmt: skip
    """One read on a fresh connection (as :func:`migration.wire.call`)."""
    what = f"read to {endpoint}"
    secure = {"ssl": tls.client_context(), "server_hostname": endpoint.host} if tls.serves else {}
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port,
                                                           **secure)  # type: ignore[arg-type]  # fmt: skip
            try:
                await _send(writer, request, auth)
                header = await _recv(reader)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise WireError(f"{what}: {exc}") from exc
    return parse_reply(header, BlocksRead, what)

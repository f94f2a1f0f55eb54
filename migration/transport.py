"""How a stage's blocks get from the source's connector to the destination's.

Both sides speak :mod:`migration.wire` over one TCP connection per stage:
the destination sends a ``ReadBlocks``, the source gathers the blocks into a
host buffer (:class:`migration.kv_blocks.BlockMover`) and answers with a
``BlocksRead`` header. A transport decides where the payload travels:

``tcp``
    in the frame, sent from a memoryview of the source's buffer in paced
    chunks and received with ``recv_into`` into the destination's staging
    buffer. Works between any two hosts.
``shm``
    same host: the source gathers into a shared-memory segment
    (``/dev/shm``) and names it in the header; the destination maps it as
    its staging buffer and unlinks it, so no byte crosses a socket. A peer
    on another host, or a segment that cannot be had (a full ``/dev/shm``),
    falls back to the frame.

A third transport fits the same two methods: NIXL (``nixl``), which would
register the KV caches and let the destination read the blocks with RDMA
(see docs/MIGRATION.md). The choice is the ``kv_transport`` setting.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from migration.kv_blocks import BufferPool, as_memoryview
from migration.pacing import Pacer
from migration.wire import BlocksRead, recv_into, refusal, send_frame

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024
"""Payloads are sent in chunks of this size (the unit of pacing)."""

AfterLayer = Callable[[int], None]
Fill = Callable[[torch.Tensor, AfterLayer], str | None]
"""Gathers the stage's blocks into a host buffer, telling the callback the
bytes done after each layer; returns why it failed, or None."""


@dataclass
class Staged:
    """Blocks ``[first, first + count)`` of a request, held on the destination."""

    first: int
    count: int
    buffer: torch.Tensor
    keep: object = None
    """What keeps ``buffer``'s memory alive (a shared-memory mapping)."""


class Transport(Protocol):
    name: str

    def send(self, sock: socket.socket, reply: BlocksRead, fill: Fill) -> None:
        """Source side: gather with ``fill`` and deliver the blocks (or a refusal)."""
        ...

    def receive(self, sock: socket.socket, reply: BlocksRead) -> Staged:
        """Destination side: the payload ``reply`` announced, in host memory."""
        ...

    def release(self, part: Staged) -> None:
        """The destination is done with ``part`` (loaded or dropped)."""
        ...


def _send_paced(sock: socket.socket, view: memoryview, pacer: Pacer) -> None:
    for start in range(0, len(view), CHUNK_BYTES):
        chunk = view[start : start + CHUNK_BYTES]
        pacer.pace(len(chunk))
        sock.sendall(chunk)


class TcpTransport:
    name = "tcp"

    def __init__(self, device: torch.device, pacer: Pacer) -> None:
        self._pacer = pacer
        self._buffers = BufferPool(device)

    def send(self, sock: socket.socket, reply: BlocksRead, fill: Fill) -> None:
        buffer = self._buffers.take(reply.bytes)
        try:
            error = fill(buffer, lambda end: None)  # paced as it is sent
            if error is not None:
                send_frame(sock, refusal(error))
                return
            send_frame(sock, reply, nbytes=reply.bytes)
            _send_paced(sock, as_memoryview(buffer), self._pacer)
        finally:
            self._buffers.give(buffer)

    def receive(self, sock: socket.socket, reply: BlocksRead) -> Staged:
        buffer = self._buffers.take(reply.bytes)
        try:
            recv_into(sock, as_memoryview(buffer))
        except BaseException:
            self._buffers.give(buffer)
            raise
        return Staged(reply.first, reply.count, buffer)

    def release(self, part: Staged) -> None:
        self._buffers.give(part.buffer)


def _same_host(sock: socket.socket) -> bool:
    peer, local = sock.getpeername()[0], sock.getsockname()[0]
    return bool(peer == local or peer.startswith("127.") or peer == "::1")


class ShmTransport:
    name = "shm"

    def __init__(self, device: torch.device, pacer: Pacer,
                 directory: Path = Path("/dev/shm")) -> None:  # fmt: skip
        self._tcp = TcpTransport(device, pacer)
        self._pacer = pacer
        self._dir = directory

    def _segment(self, nbytes: int) -> tuple[Path, mmap.mmap] | None:
        path = self._dir / f"shoal-kv-{uuid.uuid4().hex}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.debug("no shared-memory segment (%s): sending in the frame", exc)
            return None
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now, not SIGBUS later
            return path, mmap.mmap(fd, nbytes)
        except OSError as exc:
            path.unlink(missing_ok=True)
            log.debug("no shared-memory segment of %d bytes (%s): sending in the frame",
                      nbytes, exc)  # fmt: skip
            return None
        finally:
            os.close(fd)

    def send(self, sock: socket.socket, reply: BlocksRead, fill: Fill) -> None:
        segment = self._segment(reply.bytes) if _same_host(sock) and reply.bytes else None
        if segment is None:
            self._tcp.send(sock, reply, fill)
            return
        path, mapping = segment
        done = 0

        def pace(end: int) -> None:  # the gather is the copy here
            nonlocal done
            self._pacer.pace(end - done)
            done = end

        try:
            error = fill(torch.frombuffer(mapping, dtype=torch.uint8), pace)
            if error is not None:
                send_frame(sock, refusal(error))
                return
            send_frame(sock, reply.model_copy(update={"segment": path.name}))
            sock.recv(1)  # the peer closes once it has mapped the segment
        finally:
            path.unlink(missing_ok=True)
            with contextlib.suppress(BufferError):
                mapping.close()

    def receive(self, sock: socket.socket, reply: BlocksRead) -> Staged:
        if reply.segment is None:
            return self._tcp.receive(sock, reply)
        path = self._dir / Path(reply.segment).name
        with open(path, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), reply.bytes)
        path.unlink(missing_ok=True)
        buffer = torch.frombuffer(mapping, dtype=torch.uint8)
        return Staged(reply.first, reply.count, buffer, keep=mapping)

    def release(self, part: Staged) -> None:
        if not isinstance(part.keep, mmap.mmap):
            self._tcp.release(part)
            return
        part.buffer = torch.empty(0, dtype=torch.uint8)  # the mapping's last user
        with contextlib.suppress(BufferError):
            part.keep.close()


TRANSPORTS: dict[str, Callable[[torch.device, Pacer], Transport]] = {
    "tcp": TcpTransport,
    "shm": ShmTransport,
}
"""The transports by their ``kv_transport`` name."""


def make_transport(name: str, device: torch.device, pacer: Pacer) -> Transport:
    try:
        return TRANSPORTS[name](device, pacer)
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; known: {sorted(TRANSPORTS)}") from None

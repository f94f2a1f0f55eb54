"""HTTP client of the instance workers' ``/generate`` stream.

aiohttp rather than httpx: httpx's connection pool scans every connection on
each request, which at a few hundred concurrent streams costs more CPU than
the rest of the gateway together (see docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

import aiohttp
from pydantic import BaseModel

from infra.cluster_auth import RESUME_TOKEN_HEADER, ClusterKeys
from infra.contract import ChunkBatch, GenerateChunk, GenerateRequest
from infra.errors import ErrorDetail
from infra.tls import PLAIN, ClusterTls

MAX_LINE_BYTES = 1 << 22
"""Longest NDJSON line accepted from an instance (a chunk's text and ids)."""


class UpstreamError(Exception):
    """The instance failed before producing anything; the request can go elsewhere."""


class UpstreamRefused(Exception):
    """The instance refused the request (4xx): the client's error, not retried."""

    def __init__(self, status_code: int, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.status_code = status_code
        self.detail = detail


def make_session(connect_timeout_s: float, keys: ClusterKeys,
                 tls: ClusterTls = PLAIN) -> aiohttp.ClientSession:  # fmt: skip
    """One pooled session per gateway: unlimited connections, kept alive,
    every call carrying the cluster credential of ``keys``, ``https://``
    instances verified as ``tls`` says."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True,
                                     ssl=tls.client_context())  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                 headers=keys.headers())  # fmt: skip


class InstanceClient:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def resume(
        self, address: str, request_id: str, token: str | None
    ) -> AsyncGenerator[ChunkBatch, None]:
        """Chunks of a request that migrated to ``address``, from where it
        resumed, for the holder of its resume ``token``."""
        headers = {RESUME_TOKEN_HEADER: token} if token else {}
        try:
            async with self._session.get(f"{address}/resume/{request_id}",
                                         headers=headers) as resp:  # fmt: skip
                if resp.status >= 400:
                    raise UpstreamError(f"{address} could not resume {request_id}: {resp.status}")
                async for batch in _ndjson_batches(resp):
                    yield batch
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise UpstreamError(f"{address}: {type(exc).__name__}: {exc}") from exc

    async def call(self, address: str, path: str, body: BaseModel) -> tuple[int, bytes]:
        """POST ``body`` to ``address + path``: its status and body."""
        headers = {"content-type": "application/json"}
        try:
            async with self._session.post(address + path, data=body.model_dump_json(),
                                          headers=headers) as resp:  # fmt: skip
                return resp.status, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"{address}: {type(exc).__name__}: {exc}") from exc

    async def stream(
        self, address: str, body: GenerateRequest, headers: dict[str, str]
    ) -> AsyncGenerator[ChunkBatch, None]:
        """Yield the instance's chunks, in batches of those that arrived
        together. Raises :class:`UpstreamError` if the instance cannot be
        reached or fails before its first chunk; closing
        the generator early closes the connection, which aborts the request on
        the instance."""
        payload = body.model_dump_json(exclude_none=True)
        headers = {**headers, "content-type": "application/json"}
        try:
            async with self._session.post(
                address + "/generate", data=payload, headers=headers
            ) as resp:
                if resp.status >= 500:
                    raise UpstreamError(f"{address} answered {resp.status}")
                if resp.status >= 400:
                    raise UpstreamRefused(resp.status, _error_detail(await resp.read()))
                async for batch in _ndjson_batches(resp):
                    yield batch
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:  # ValueError: bad JSON
            raise UpstreamError(f"{address}: {type(exc).__name__}: {exc}") from exc


async def _ndjson_batches(resp: aiohttp.ClientResponse) -> AsyncGenerator[ChunkBatch, None]:
    """Chunks from an NDJSON response, one batch per read: under load several
    arrive at once and go on to the client in one write. Stopping early (the
    client went away) closes the connection, which aborts the request."""
    pending = b""
    finished = False
    try:
        async for data in resp.content.iter_any():
            *lines, pending = (pending + data).split(b"\n")
            if len(pending) > MAX_LINE_BYTES:
                raise UpstreamError(f"an instance sent a line over {MAX_LINE_BYTES} bytes")
            batch = [GenerateChunk.model_validate_json(line) for line in lines if line.strip()]
            if batch:
                yield batch
        if pending.strip():
            yield [GenerateChunk.model_validate_json(pending)]
        finished = True
    finally:
        if not finished:
            resp.close()


def _error_detail(raw: bytes) -> ErrorDetail:
    """The ``error`` object of an instance's OpenAI-format error body."""
    try:
        return ErrorDetail.model_validate(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return ErrorDetail(message=raw.decode(errors="replace")[:500] or "refused",
                           type="invalid_request_error")  # fmt: skip

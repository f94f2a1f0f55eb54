"""The instance worker's handle on Shoal's KV connector (``migration.kv_connector``),
which lives inside vLLM's worker process(es) beside the KV cache: the
:class:`migration.ports.KvPort` of the vLLM engine, over the wire.

With tensor parallelism every rank holds a slice of each layer (its KV
heads) and runs its own connector, rank ``r`` on ``port + r``; a migration
moves each rank's slice between equal ranks, so every call goes to every
rank."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import BaseModel

from infra.tls import PLAIN, ClusterTls
from migration.ports import KvStatus
from migration.wire import (
    BlocksStaged,
    Drop,
    Endpoint,
    GetStatus,
    Grant,
    Pin,
    R,
    Reply,
    Revoke,
    StageBlocks,
    StatusReply,
    Unpin,
    call,
)


class ConnectorPort:
    """:class:`KvPort` over the wire to Shoal's KV connector on each rank."""

    def __init__(self, endpoint: Endpoint, ranks: int = 1, auth: str | None = None,
                 tls: ClusterTls = PLAIN) -> None:  # fmt: skip
        """``auth``: the cluster's KV credential (None: an open cluster);
        ``tls``: how the connectors serve (TLS or plain TCP)."""
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        self._ranks = [Endpoint(endpoint.host, endpoint.port + r) for r in range(ranks)]
        self._auth = auth
        self._tls = tls
        self._block_bytes = 0

    @property
    def endpoint(self) -> str:
        """Rank 0's endpoint; peers find rank ``r`` at its port + ``r``."""
        return str(self._ranks[0])

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all ranks (0 until :meth:`status` ran)."""
        return self._block_bytes

    async def _call_all(self, make: Callable[[int], BaseModel], reply: type[R]) -> list[R]:
        """One call per rank, concurrently; the first failure is raised once
        every call has ended (no rank is left mid-call)."""
        results = await asyncio.gather(
            *(
                asyncio.to_thread(call, ep, make(r), reply, auth=self._auth, tls=self._tls)
                for r, ep in enumerate(self._ranks)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [answer for answer, _ in results]  # type: ignore[misc]

    async def stage(
        self, key: str, source: str, request_id: str, first: int, count: int, grant: str
    ) -> int:
        src = Endpoint.parse(source)

        def make(rank: int) -> BaseModel:
            return StageBlocks(key=key, source=str(Endpoint(src.host, src.port + rank)),
                               request_id=request_id, first=first, count=count,
                               grant=grant)  # fmt: skip

        return sum(r.bytes for r in await self._call_all(make, BlocksStaged))

    async def drop(self, key: str) -> None:
        await self._call_all(lambda _: Drop(key=key), Reply)

    async def grant(self, request_id: str, token: str) -> None:
        await self._call_all(lambda _: Grant(request_id=request_id, token=token), Reply)

    async def revoke(self, request_id: str) -> None:
        await self._call_all(lambda _: Revoke(request_id=request_id), Reply)

    async def pin(self, request_id: str) -> None:
        await self._call_all(lambda _: Pin(request_id=request_id), Reply)

    async def unpin(self, request_id: str) -> None:
        await self._call_all(lambda _: Unpin(request_id=request_id), Reply)

    async def status(self) -> KvStatus:
        """Rank 0's state, with block bytes and loads summed over the ranks."""
        replies = await self._call_all(lambda _: GetStatus(), StatusReply)
        self._block_bytes = sum(r.block_bytes for r in replies)
        merged = KvStatus.model_validate(replies[0].model_dump())
        merged.block_bytes = self._block_bytes
        return merged

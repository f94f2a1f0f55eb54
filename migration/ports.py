"""What migration needs of an instance's engine, as interfaces migration owns:
the engine's KV port (moving blocks between instances). The instance's
engines implement it; migration never imports the instance."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field


class KvStatus(BaseModel):
    """A KV port's state (``GET /migrations/kv``): all empty when idle."""

    pinned: list[str] = Field(default_factory=list)
    """Engine requests whose blocks are kept after their end, for a migration."""
    delayed: list[str] = Field(default_factory=list)
    """Ended requests whose blocks vLLM has not freed yet (pinned or in flight)."""
    staging: dict[str, int] = Field(default_factory=dict)
    """Blocks staged here per incoming migration key."""
    block_bytes: int = 0
    loaded_blocks: int = 0
    """Blocks loaded from staging into the engine, in total."""
    load_s: dict[str, float] = Field(default_factory=dict)
    """Seconds each recent incoming migration (by key) took to load its
    staged blocks into the cache (part of its first step)."""
    load_at: dict[str, float] = Field(default_factory=dict)
    """When each of those loads started (``time.monotonic()``: the host's
    clock, shared by the engine's processes and the worker)."""
    unauthenticated: int = 0
    """Connections refused for want of the cluster's KV credential, in total."""
    granted: list[str] = Field(default_factory=list)
    """Engine requests whose blocks a migration's destination may read now."""
    not_granted: int = 0
    """Reads refused for want of the migration's read grant, in total."""


class KvPort(Protocol):
    """Moving KV blocks between instances for live migration: an engine that
    has one can migrate by KV transfer; all engines can recompute.

    Blocks are a request's logical blocks (0 = its first ``block_size``
    tokens); ``request_id`` is the engine's id of the running request."""

    @property
    def endpoint(self) -> str:
        """``host:port`` where peers read this instance's blocks."""
        ...

    @property
    def block_bytes(self) -> int: ...

    async def stage(
        self, key: str, source: str, request_id: str, first: int, count: int, grant: str
    ) -> int:
        """Pull blocks ``[first, first + count)`` of ``request_id`` from the
        instance at ``source`` into staging under ``key``, with the read
        ``grant`` the source issued for this migration; returns bytes."""
        ...

    async def grant(self, request_id: str, token: str) -> None:
        """Serve the request's blocks to reads carrying ``token`` (and no
        others) until revoked: one migration's destination."""
        ...

    async def revoke(self, request_id: str) -> None: ...

    async def drop(self, key: str) -> None:
        """Forget what is staged under ``key``."""
        ...

    async def pin(self, request_id: str) -> None:
        """Keep the request's blocks after it is stopped, until unpinned."""
        ...

    async def unpin(self, request_id: str) -> None: ...

    async def status(self) -> KvStatus:
        """Pins, staging areas and delayed frees (all empty when idle)."""
        ...

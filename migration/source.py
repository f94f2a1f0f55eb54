"""The source side of a live migration: multi-stage KV copy while the request
keeps decoding, then a short stop, the last blocks, and a commit on the
destination. The request keeps running here whenever the migration fails.

    stage 1: copy all full blocks          (request decoding here)
    stage k: copy blocks filled meanwhile  (request decoding here)
    stop:    pin blocks, freeze, abort     (downtime starts)
    commit:  one round trip: the destination pulls the remaining full blocks
             (at most ``final_blocks``, as the live stages ran until then),
             and answers once its engine has admitted the request (the
             hand-off; it loads the staged blocks into the request's cache
             before its first step there and recomputes the tail with it)
    done:    unpin (blocks freed), stream points the client to the destination

No step waits for the destination's first token: on a busy destination that
can be seconds away, and the client is better off reading the request's
output there as soon as it comes.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from migration.plan import DEFAULT_PLAN, StagePlan, StageStep, full_blocks, stage_step
from migration.policies import choose_mode
from migration.ports import KvPort
from migration.protocol import (
    CommitReply,
    DowntimeParts,
    MigrationRecord,
    Mode,
    Outcome,
    ResumeSpec,
    StageRequest,
)

log = logging.getLogger(__name__)


class Refused(Exception):
    """The destination has no room (it answered 409)."""


class DestinationApi(Protocol):
    """The destination instance's migration endpoints."""

    address: str

    async def reserve(self, key: str, num_blocks: int) -> None: ...
    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int, grant: str) -> int: ...  # fmt: skip
    async def commit(self, spec: ResumeSpec) -> CommitReply: ...
    async def abort(self, key: str) -> None: ...


class Outgoing(Protocol):
    """The request being moved, as the source instance serves it."""

    finished: bool
    frozen: bool
    engine_request_id: str

    @property
    def request_id(self) -> str: ...

    @property
    def tokens(self) -> list[int]:
        """Its whole context so far: prompt and output."""
        ...

    @property
    def num_remaining(self) -> int:
        """Tokens it may still generate."""
        ...

    @property
    def holds_kv(self) -> bool:
        """Whether its engine request has computed KV to move (it has produced
        a token): a waiting request has none, and moves by recompute."""
        ...

    def freeze(self) -> list[int]:
        """Stop streaming here; returns the context the destination takes over."""
        ...

    def moved_to(self, address: str) -> None:
        """The destination has it: end the client's stream with a pointer there."""
        ...

    def resume_here(self) -> None:
        """The migration failed after the freeze: carry on here."""
        ...

    def resume_spec(self, key: str, tokens: list[int], num_kv_tokens: int, *,
                    frozen_for_s: float) -> ResumeSpec:  # fmt: skip
        """What the destination needs to continue it from ``tokens``."""
        ...


class SourceEngine(Protocol):
    async def abort(self, request_id: str) -> bool: ...


async def migrate_out(
    gen: Outgoing,
    *,
    source: str,
    destination: DestinationApi,
    engine: SourceEngine,
    port: KvPort | None,
    block_size: int,
    mode: Mode = "auto",
    plan: StagePlan = DEFAULT_PLAN,
    clock: Callable[[], float] = time.monotonic,
) -> MigrationRecord:
    chosen = choose_mode(mode, kv_available=port is not None and gen.holds_kv,
                         num_tokens=len(gen.tokens), block_size=block_size)  # fmt: skip
    move = _Move(gen, destination, port if chosen == "kv" else None, block_size, clock,
                 MigrationRecord(request_id=gen.request_id, source=source,
                                 destination=destination.address, mode=chosen,
                                 outcome=Outcome.FAILED, started_at=time.time()))  # fmt: skip
    move.record.key = move.key
    t0 = clock()
    try:
        if await move.granted() and await move.live_stages(plan) and await move.stop(engine):
            await move.hand_off()
    finally:
        if move.kv is not None:
            await _quietly(move.kv.revoke(gen.engine_request_id))
        move.record.duration_s = clock() - t0
    return move.record


@dataclass
class _Move:
    """One migration in progress; each step records its outcome if it ends it."""

    gen: Outgoing
    destination: DestinationApi
    kv: KvPort | None
    """None when recomputing: no stages, nothing pinned."""
    block_size: int
    clock: Callable[[], float]
    record: MigrationRecord
    key: str = ""
    copied: int = 0
    stopped_at: float = 0.0
    stop_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    grant: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    """The read grant of this migration: the source's KV port serves the
    request's blocks only to reads carrying it, which only this destination
    is given (in its stage requests)."""

    def __post_init__(self) -> None:
        self.key = f"{self.gen.request_id}/{uuid.uuid4().hex[:8]}"

    async def granted(self) -> bool:
        """Register the read grant with the source's KV port (KV moves only)."""
        if self.kv is None:
            return True
        try:
            await self.kv.grant(self.gen.engine_request_id, self.grant)
        except Exception as exc:
            return await self._end(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        return True

    def _gone(self) -> bool:
        """It ended here (or is ending: every token is out) or another move froze it."""
        return self.gen.finished or self.gen.frozen or self.gen.num_remaining <= 0

    async def _copy_up_to(self, full: int, engine_request_id: str) -> None:
        assert self.kv is not None
        await self.destination.reserve(self.key, full)
        self.record.bytes += await self.destination.stage(
            self.key,
            self.kv.endpoint,
            engine_request_id,
            self.copied,
            full - self.copied,
            self.grant,
        )
        self.record.blocks += full - self.copied
        self.copied = full

    async def _end(self, outcome: Outcome, error: str | None = None) -> bool:
        self.record.outcome, self.record.error = outcome, error
        await _quietly(self.destination.abort(self.key))
        return False

    async def live_stages(self, plan: StagePlan) -> bool:
        """Copy full blocks while the request decodes here; False if the
        migration ended (refused, failed, or the request finished here)."""
        try:
            while self.kv is not None:
                if self._gone():
                    return await self._end(Outcome.SOURCE_FINISHED)
                full = full_blocks(len(self.gen.tokens), self.block_size)
                step = stage_step(plan, self.record.stages, full - self.copied)
                if step is StageStep.STOP:
                    break
                if step is StageStep.COPY:
                    await self._copy_up_to(full, self.gen.engine_request_id)
                self.record.stages += 1
        except Refused as exc:
            return await self._end(Outcome.REFUSED, str(exc))
        except Exception as exc:
            # A stage fails when the request ends here meanwhile (its blocks are gone).
            outcome = Outcome.SOURCE_FINISHED if self._gone() else Outcome.FAILED
            return await self._end(outcome, f"{type(exc).__name__}: {exc}")
        if self._gone():
            return await self._end(Outcome.SOURCE_FINISHED)
        return True

    async def stop(self, engine: SourceEngine) -> bool:
        """Pin the request's blocks, freeze it and end it in the engine: from
        here the client waits (the downtime). False if that failed."""
        engine_id = self.gen.engine_request_id
        try:
            if self.kv is not None:
                await self.kv.pin(engine_id)  # fails if the request just ended here
        except Exception as exc:
            outcome = Outcome.SOURCE_FINISHED if self._gone() else Outcome.FAILED
            return await self._end(outcome, f"{type(exc).__name__}: {exc}")
        self.tokens = self.gen.freeze()
        self.stopped_at = self.clock()
        try:
            await engine.abort(engine_id)
            self.stop_s = self.clock() - self.stopped_at
        except Exception as exc:  # the engine is failing: let the request carry on here
            await self._end(Outcome.ROLLED_BACK, f"{type(exc).__name__}: {exc}")
            self.gen.resume_here()
            if self.kv is not None:
                await _quietly(self.kv.unpin(engine_id))
            return False
        return True

    def _final_stage(self) -> StageRequest | None:
        """The full blocks the live stages left: the commit carries them."""
        if self.kv is None:
            return None
        full = full_blocks(len(self.tokens), self.block_size)
        if full <= self.copied:
            return None
        return StageRequest(key=self.key, source=self.kv.endpoint,
                            engine_request_id=self.gen.engine_request_id,
                            first=self.copied, count=full - self.copied,
                            grant=self.grant)  # fmt: skip

    async def hand_off(self) -> None:
        """Commit, with the last full blocks for the destination to pull; the
        request carries on here if the destination fails now."""
        try:
            final = self._final_stage()
            num_kv_blocks = final.first + final.count if final else self.copied
            spec = self.gen.resume_spec(
                self.key, self.tokens, num_kv_blocks * self.block_size if self.kv else 0,
                frozen_for_s=self.clock() - self.stopped_at,
            ).model_copy(update={"final": final})  # fmt: skip
            sent = self.clock()
            reply = await self.destination.commit(spec)
            done = self.clock()
            if final is not None:
                self.record.stages += 1
                self.record.blocks += final.count
                self.record.bytes += reply.final_bytes
            self.record.downtime_s = done - self.stopped_at
            self.record.downtime = DowntimeParts(
                stop_s=self.stop_s, final_copy_s=reply.final_copy_s, admit_s=reply.admitted_s,
                commit_s=max(0.0, done - sent - reply.final_copy_s - reply.admitted_s),
            )  # fmt: skip
            self.record.outcome = Outcome.MIGRATED
            self.gen.moved_to(self.destination.address)
        except Exception as exc:
            await self._end(Outcome.ROLLED_BACK, f"{type(exc).__name__}: {exc}")
            log.warning("migration of %s rolled back: %s", self.gen.request_id, self.record.error)
            self.gen.resume_here()
        finally:
            if self.kv is not None:
                await _quietly(self.kv.unpin(self.gen.engine_request_id))


async def _quietly(coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except Exception as exc:
        log.debug("ignored during migration cleanup: %s", exc)

"""The source side of a live migration: multi-stage KV copy while the request
keeps decoding, then a short stop, the last blocks, and a commit on the
destination. The request keeps running here whenever the migration fails.

    stage 1: copy all full blocks          (request decoding here)
    stage k: copy blocks filled meanwhile  (request decoding here)
    stop:    pin blocks, freeze, abort     (downtime starts)
    final:   copy the remaining blocks, commit on the destination, which
             answers once its engine has admitted the request (the hand-off;
             it loads the staged blocks and recomputes the tail when the
             request is scheduled there)
    done:    unpin (blocks freed), stream points the client to the destination

No step waits for the destination's first token: on a busy destination that
can be seconds away, and the client is better off reading the request's
output there as soon as it comes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from instance.engine import KvPort
from instance.generation import Generation
from migration.policies import choose_mode
from migration.protocol import (
    CommitReply,
    MigrationRecord,
    Mode,
    Outcome,
    ResumeSpec,
)

log = logging.getLogger(__name__)


class Refused(Exception):
    """The destination has no room (it answered 409)."""


class DestinationApi(Protocol):
    """The destination instance's migration endpoints."""

    address: str

    async def reserve(self, key: str, num_blocks: int) -> None: ...
    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int) -> int: ...  # fmt: skip
    async def commit(self, spec: ResumeSpec) -> CommitReply: ...
    async def abort(self, key: str) -> None: ...


@dataclass(frozen=True)
class StagePlan:
    max_stages: int = 8
    final_blocks: int = 1
    """Stop once a stage would copy at most this many new blocks."""


class SourceEngine(Protocol):
    async def abort(self, request_id: str) -> bool: ...


async def migrate_out(
    gen: Generation,
    *,
    source: str,
    destination: DestinationApi,
    engine: SourceEngine,
    port: KvPort | None,
    block_size: int,
    mode: Mode = "auto",
    plan: StagePlan = StagePlan(),
    clock: Callable[[], float] = time.monotonic,
) -> MigrationRecord:
    chosen = choose_mode(mode, kv_available=port is not None, num_tokens=len(gen.tokens),
                         block_size=block_size)  # fmt: skip
    record = MigrationRecord(request_id=gen.request_id, source=source,
                             destination=destination.address, mode=chosen,
                             outcome=Outcome.FAILED, started_at=time.time())  # fmt: skip
    key = f"{gen.request_id}/{uuid.uuid4().hex[:8]}"
    t0 = clock()
    kv = port if chosen == "kv" else None
    copied = 0
    try:
        # Live stages: the request keeps decoding here.
        while kv is not None and record.stages < plan.max_stages:
            if gen.finished or gen.frozen:
                record.outcome = Outcome.SOURCE_FINISHED
                await _quietly(destination.abort(key))
                return _done(record, t0, clock)
            new = (len(gen.tokens) - 1) // block_size - copied
            if record.stages > 0 and new <= plan.final_blocks:
                break
            if new > 0:
                await destination.reserve(key, copied + new)
                record.bytes += await destination.stage(
                    key, kv.endpoint, gen.engine_request_id, copied, new
                )
                copied += new
                record.blocks += new
            record.stages += 1
        if gen.finished or gen.frozen:
            record.outcome = Outcome.SOURCE_FINISHED
            await _quietly(destination.abort(key))
            return _done(record, t0, clock)
        # Stop: from here the client waits (downtime).
        engine_id = gen.engine_request_id
        if kv is not None:
            await kv.pin(engine_id)
        tokens = gen.freeze()
        stopped = clock()
        await engine.abort(engine_id)
    except Refused as exc:
        record.outcome, record.error = Outcome.REFUSED, str(exc)
        await _quietly(destination.abort(key))
        return _done(record, t0, clock)
    except Exception as exc:
        # A stage fails when the request ends here meanwhile (its blocks are gone).
        finished = gen.finished or gen.frozen
        record.outcome = Outcome.SOURCE_FINISHED if finished else Outcome.FAILED
        record.error = f"{type(exc).__name__}: {exc}"
        await _quietly(destination.abort(key))
        return _done(record, t0, clock)
    try:
        num_kv_tokens = 0
        if kv is not None:
            full = (len(tokens) - 1) // block_size
            if full > copied:
                await destination.reserve(key, full)
                record.bytes += await destination.stage(key, kv.endpoint, engine_id, copied,
                                                        full - copied)  # fmt: skip
                record.blocks += full - copied
                record.stages += 1
                copied = full
            num_kv_tokens = copied * block_size
        spec = _resume_spec(gen, key, tokens, num_kv_tokens, frozen_for_s=clock() - stopped)
        await destination.commit(spec)
        record.downtime_s = clock() - stopped
        record.outcome = Outcome.MIGRATED
        gen.moved_to(destination.address)
    except Exception as exc:
        record.outcome, record.error = Outcome.ROLLED_BACK, f"{type(exc).__name__}: {exc}"
        log.warning("migration of %s rolled back: %s", gen.request_id, record.error)
        await _quietly(destination.abort(key))
        gen.resume_here()
    finally:
        if kv is not None:
            await _quietly(kv.unpin(engine_id))
    return _done(record, t0, clock)


def _resume_spec(gen: Generation, key: str, tokens: list[int], num_kv_tokens: int, *,
                 frozen_for_s: float) -> ResumeSpec:  # fmt: skip
    r, s = gen.request, gen.request.sampling
    num_prompt = len(r.prompt_token_ids)
    return ResumeSpec(
        key=key, request_id=gen.request_id, prompt_token_ids=list(r.prompt_token_ids),
        output_token_ids=tokens[num_prompt:], num_kv_tokens=num_kv_tokens,
        max_tokens=s.max_tokens, min_tokens=s.min_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, seed=s.seed, stop=list(s.stop), ignore_eos=s.ignore_eos,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty, priority=r.priority,
        arrival_time=r.arrival_time, emitted_chars=gen.emitted_chars, frozen_for_s=frozen_for_s,
    )  # fmt: skip


def _done(record: MigrationRecord, t0: float, clock: Callable[[], float]) -> MigrationRecord:
    record.duration_s = clock() - t0
    return record


async def _quietly(coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except Exception as exc:
        log.debug("ignored during migration cleanup: %s", exc)

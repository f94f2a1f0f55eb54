"""The hand-off of a migrated request, between in-process sim workers running
the real source (``migrate_out``) and destination (``Inbox``): the commit
completes once the destination's engine has admitted the request, however
long its queue; the request is then held for its client, whose claim can only
expire while no client is attached, and a client that comes late still gets
every chunk from the first."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from infra.contract import GenerateChunk
from infra.errors import NotFoundError
from instance.generation import Generation
from instance.migration_host import WorkerMigrationHost
from migration.protocol import Mode, Outcome
from migration.source import migrate_out
from tests.migration.test_sim_migration import (
    BS,
    OWNER,
    InboxDestination,
    Sim,
    _drain,
    _idle,
    _sim,
    _source_gen,
    _until,
)

PROMPT, MAX_TOKENS = 30, 400


def _tokens(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def _reference(sim: Sim) -> list[int]:
    request, _ = _source_gen("ref", PROMPT, MAX_TOKENS)
    return _tokens(await _drain(sim.worker.run(request)))


async def _start_and_migrate(
    src: Sim, dst: Sim, rid: str, mode: Mode = "recompute"
) -> tuple[list[GenerateChunk], Generation]:
    """Stream ``rid`` on ``src`` until it has output, migrate it to ``dst``;
    returns the source's chunks (ending with ``migrated_to``)."""
    request, gen = _source_gen(rid, PROMPT, MAX_TOKENS)
    stream = asyncio.ensure_future(_drain(src.worker.run(request, gen, migratable=True)))
    await _until(lambda: len(gen.delivered) >= 3 * BS)
    record = await migrate_out(
        gen,
        source=src.worker.config.address,
        destination=InboxDestination(dst.worker),
        engine=src.engine,
        port=src.port,
        block_size=BS,
        mode=mode,
    )  # type: ignore[arg-type]
    assert record.outcome is Outcome.MIGRATED, record
    here = await stream
    assert here[-1].migrated_to == dst.worker.config.address
    return here, gen


def _unclaimed(sim: Sim) -> float:
    value = sim.worker.metrics.migration.unclaimed._value.get()
    return float(value)


async def test_handoff_on_a_busy_destination_comes_at_admission_not_first_token() -> None:
    """The destination runs one request at a time and is busy for many claim
    timeouts: the migration completes while the request waits in its queue,
    and the client, attached from the hand-off on, gets the whole output."""
    async with (
        _sim("ref", speedup=1000) as ref,
        _sim("src", speedup=50) as src,
        _sim("dst", speedup=50, max_num_seqs=1, resume_timeout_s=0.3) as dst,
    ):
        reference = await _reference(ref)
        hog_request, hog = _source_gen("hog", 10, 3000)
        hog_stream = asyncio.ensure_future(_drain(dst.worker.run(hog_request, hog)))
        await _until(lambda: len(hog.delivered) > 0)
        here, _ = await _start_and_migrate(src, dst, "queued", mode="kv")
        moved = dst.worker.generation("queued")
        assert moved is not None and moved.delivered == []  # handed over while queued
        assert any(r.request_id == moved.engine_request_id for r in dst.engine.load().waiting)
        rest = await _drain(dst.worker.resume("queued", OWNER))
        # One at a time: the migrated request waited for all 3,000 of the hog's steps.
        assert hog_stream.done() and len(hog.delivered) == 3000
        assert _tokens(here) + _tokens(rest) == reference
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == MAX_TOKENS
        assert _unclaimed(dst) == 0
        await _until(lambda: _idle(src) and _idle(dst))


async def test_a_late_client_gets_every_chunk_from_the_first() -> None:
    async with (
        _sim("ref", speedup=1000) as ref,
        _sim("src", speedup=50) as src,
        _sim("dst", speedup=50) as dst,
    ):
        reference = await _reference(ref)
        here, _ = await _start_and_migrate(src, dst, "late")
        moved = dst.worker.generation("late")
        assert moved is not None
        await _until(lambda: len(moved.delivered) >= 20)  # produced while nobody listened
        for thief in (None, "", "a-guessed-token-of-some-length", OWNER + "x"):
            with pytest.raises(NotFoundError):  # as if nothing waited: the id tells nothing
                dst.worker.resume("late", thief)
        assert dst.worker.parked == ["late"]  # still there for its owner
        rest = await _drain(dst.worker.resume("late", OWNER))
        assert _tokens(here) + _tokens(rest) == reference
        await _until(lambda: _idle(src) and _idle(dst))


async def test_an_unclaimed_request_is_aborted_counted_and_leaves_nothing() -> None:
    async with _sim("src", speedup=50) as src, _sim("dst", speedup=50, resume_timeout_s=0.2) as dst:
        await _start_and_migrate(src, dst, "orphan", mode="kv")
        assert dst.worker.parked == ["orphan"]
        await _until(lambda: not dst.worker.parked and dst.worker.generation("orphan") is None)
        assert _unclaimed(dst) == 1
        await _until(lambda: _idle(src) and _idle(dst))


async def test_a_request_whose_tokens_are_all_out_is_not_moved_and_ends_where_it_is() -> None:
    """Every token is out but its end is not (the engine request was stopped
    for a move that rolled back): nothing is left to move, and a new engine
    request of no tokens would be refused; it ends here with its usage."""
    async with _sim("src", speedup=50) as src, _sim("dst", speedup=50) as dst:
        request, gen = _source_gen("done", PROMPT, 3)
        gen.continue_after([97, 98, 99], emitted_chars=0)  # all three tokens already out
        chunks = await _drain(src.worker.run(request, gen, migratable=True))
        assert chunks[-1].finish_reason == "length" and chunks[-1].token_ids == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        assert gen.num_remaining == 0
        host = WorkerMigrationHost(src.worker)
        assert host.movable() == []
        await _until(lambda: _idle(src) and _idle(dst))


async def test_a_kv_migration_reports_its_downtime_in_parts_on_both_sides() -> None:
    """The final blocks travel with the commit; the source's record splits
    its share of the downtime, the destination's arrival the rest."""
    async with (
        _sim("ref", speedup=1000) as ref,
        _sim("src", speedup=50) as src,
        _sim("dst", speedup=50) as dst,
    ):
        reference = await _reference(ref)
        request, gen = _source_gen("parts", PROMPT, MAX_TOKENS)
        stream = asyncio.ensure_future(_drain(src.worker.run(request, gen, migratable=True)))
        await _until(lambda: len(gen.delivered) >= 3 * BS)
        destination = InboxDestination(dst.worker)
        record = await migrate_out(gen, source=src.worker.config.address,
                                   destination=destination, engine=src.engine, port=src.port,
                                   block_size=BS, mode="kv")  # fmt: skip
        assert record.outcome is Outcome.MIGRATED and record.mode == "kv", record
        rest = await _drain(dst.worker.resume("parts", OWNER))
        assert _tokens(await stream) + _tokens(rest) == reference
        parts = record.downtime
        assert parts is not None and record.downtime_s is not None
        assert min(parts.stop_s, parts.final_copy_s, parts.admit_s, parts.commit_s) >= 0
        assert parts.stop_s + parts.final_copy_s + parts.admit_s <= record.downtime_s
        await _until(lambda: len(destination.inbox.arrivals) == 1)
        arrival = destination.inbox.arrivals[0]
        assert arrival.key == record.key and arrival.mode == "kv"
        assert arrival.first_step_s is not None and arrival.first_step_s >= 0
        assert arrival.downtime_s is not None and arrival.downtime_s >= arrival.frozen_for_s
        assert arrival.load_s is None  # the sim's port models no load time
        await _until(lambda: _idle(src) and _idle(dst))


async def test_stop_strings_hold_across_a_migration() -> None:
    """Text held back because it may begin a stop string moves with the
    request: the output is the unmigrated one, cut at the stop string."""
    async with (
        _sim("ref", speedup=1000) as ref,
        _sim("src", speedup=50) as src,
        _sim("dst", speedup=50) as dst,
    ):
        reference = await _drain(ref.worker.run(_source_gen("plain", PROMPT, MAX_TOKENS)[0]))
        text = "".join(c.text for c in reference)
        # A stop string first seen long after the migration point (3 blocks of output).
        stop = next(text[i : i + 3] for i in range(300, len(text) - 3)
                    if text.find(text[i : i + 3]) == i)  # fmt: skip
        expected = text[: text.find(stop)]
        request, gen = _source_gen("stops", PROMPT, MAX_TOKENS)
        request = replace(request, sampling=request.sampling.model_copy(update={"stop": (stop,)}))
        gen = Generation(request, num_prompt_tokens=len(request.prompt_token_ids),
                         resume_token=OWNER)  # fmt: skip
        stream = asyncio.ensure_future(_drain(src.worker.run(request, gen, migratable=True)))
        await _until(lambda: len(gen.delivered) >= 3 * BS)
        record = await migrate_out(gen, source=src.worker.config.address,
                                   destination=InboxDestination(dst.worker), engine=src.engine,
                                   port=src.port, block_size=BS, mode="kv")  # fmt: skip
        assert record.outcome is Outcome.MIGRATED, record
        here = await stream
        rest = await _drain(dst.worker.resume("stops", OWNER))
        assert "".join(c.text for c in here + rest) == expected
        assert rest[-1].finish_reason == "stop"
        await _until(lambda: _idle(src) and _idle(dst))

"""The source-side state machine with injected peers: every way a migration
can end leaves the request either moved or running here, and the
destination's reservation returned."""

from __future__ import annotations

import asyncio

from infra.contract import SamplingSpec
from instance.engine import EngineRequest
from instance.generation import Generation
from migration.plan import StagePlan
from migration.protocol import CommitReply, Outcome, ResumeSpec
from migration.source import Refused, migrate_out

BS = 4


class Destination:
    address = "http://dest"

    def __init__(self, *, refuse: bool = False, fail_commit: bool = False,
                 on_stage: object = None) -> None:  # fmt: skip
        self.refuse, self.fail_commit, self.on_stage = refuse, fail_commit, on_stage
        self.staged: list[tuple[int, int]] = []
        self.grants: set[str] = set()
        self.aborted: list[str] = []
        self.committed: ResumeSpec | None = None

    async def reserve(self, key: str, num_blocks: int) -> None:
        if self.refuse:
            raise Refused("no room")

    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int, grant: str) -> int:  # fmt: skip
        self.staged.append((first, count))
        self.grants.add(grant)
        if callable(self.on_stage):
            self.on_stage()
        return count * 100

    async def commit(self, spec: ResumeSpec) -> CommitReply:
        if self.fail_commit:
            raise ConnectionError("destination died")
        self.committed = spec
        if spec.final is None:
            return CommitReply(admitted_s=0.01)
        self.staged.append((spec.final.first, spec.final.count))  # it pulls the final blocks
        return CommitReply(admitted_s=0.01, final_copy_s=0.002, final_bytes=spec.final.count * 100)

    async def abort(self, key: str) -> None:
        self.aborted.append(key)


class Port:
    endpoint = "src:1"
    block_bytes = 100

    def __init__(self) -> None:
        self.pinned: set[str] = set()
        self.granted: dict[str, str] = {}
        self.log: list[str] = []

    async def stage(
        self, key: str, source: str, request_id: str, first: int, count: int, grant: str
    ) -> int:
        raise AssertionError("the source never stages")

    async def grant(self, request_id: str, token: str) -> None:
        self.granted[request_id] = token
        self.log.append("grant")

    async def revoke(self, request_id: str) -> None:
        self.granted.pop(request_id, None)
        self.log.append("revoke")

    async def drop(self, key: str) -> None: ...

    async def pin(self, request_id: str) -> None:
        self.pinned.add(request_id)
        self.log.append("pin")

    async def unpin(self, request_id: str) -> None:
        self.pinned.discard(request_id)
        self.log.append("unpin")

    async def status(self) -> dict[str, object]:
        return {}


class Engine:
    def __init__(self, port: Port, *, kv: bool) -> None:
        self.port, self.kv = port, kv
        self.aborted: list[str] = []

    async def abort(self, request_id: str) -> bool:
        if self.kv:
            assert request_id in self.port.pinned, "blocks must be pinned before the stop"
        self.aborted.append(request_id)
        return True


def _generation(num_output: int = 20) -> Generation:
    request = EngineRequest("r", tuple(range(10)), SamplingSpec(max_tokens=100))
    gen = Generation(request, num_prompt_tokens=10)
    gen.next_segment()
    gen.delivered.extend(range(num_output))
    return gen


async def _run(gen: Generation, dest: Destination, port: Port | None = None, mode: str = "kv"):  # type: ignore[no-untyped-def]
    port = port or Port()
    engine = Engine(port, kv=mode == "kv")
    record = await migrate_out(gen, source="http://src", destination=dest, engine=engine,
                               port=port, block_size=BS, mode=mode,  # type: ignore[arg-type]
                               plan=StagePlan(max_stages=4, final_blocks=1))  # fmt: skip
    return record, engine, port


async def test_kv_migration_copies_in_stages_then_commits() -> None:
    gen = _generation(20)  # 30 tokens: 7 full blocks computed
    grow = iter([5, 0, 0, 0])  # the request decodes 5 more tokens during stage 1

    def decode() -> None:
        gen.delivered.extend(range(next(grow)))

    dest = Destination(on_stage=decode)
    record, engine, port = await _run(gen, dest)
    assert record.outcome is Outcome.MIGRATED and record.mode == "kv"
    assert dest.staged[0] == (0, 7)  # stage 1: everything full so far
    assert sum(c for _, c in dest.staged) == record.blocks == (35 - 1) // BS
    # The block filled meanwhile travels with the commit: the stop is one round trip.
    assert dest.committed is not None and dest.committed.final is not None
    assert (dest.committed.final.first, dest.committed.final.count) == (7, 1)
    assert record.bytes == record.blocks * 100
    assert record.downtime is not None and record.downtime.final_copy_s == 0.002
    assert record.downtime.admit_s == 0.01
    assert dest.committed is not None and dest.committed.num_kv_tokens == record.blocks * BS
    assert dest.committed.output_token_ids == list(gen.tokens[10:])
    assert port.log == ["grant", "pin", "unpin", "revoke"] and not port.pinned
    # Every read of this migration carried the one grant, revoked at its end.
    assert len(dest.grants) == 1 and dest.committed.final.grant in dest.grants
    assert not port.granted
    assert engine.aborted == [gen.engine_request_id]
    assert await gen.outcome() == "http://dest"


async def test_refused_destination_leaves_the_request_alone() -> None:
    gen = _generation()
    dest = Destination(refuse=True)
    record, engine, port = await _run(gen, dest)
    assert record.outcome is Outcome.REFUSED
    assert not gen.frozen and engine.aborted == [] and port.log == ["grant", "revoke"]
    assert len(dest.aborted) == 1  # the reservation is returned


async def test_request_finishing_during_a_stage_aborts_the_migration() -> None:
    gen = _generation()

    def finish() -> None:
        gen.finished = True

    dest = Destination(on_stage=finish)
    record, engine, _ = await _run(gen, dest)
    assert record.outcome is Outcome.SOURCE_FINISHED
    assert engine.aborted == [] and not gen.frozen and len(dest.aborted) == 1


async def test_destination_dying_after_the_stop_rolls_back_to_the_source() -> None:
    gen = _generation()
    dest = Destination(fail_commit=True)
    record, engine, port = await _run(gen, dest)
    assert record.outcome is Outcome.ROLLED_BACK and "destination died" in (record.error or "")
    assert engine.aborted and port.log == ["grant", "pin", "unpin", "revoke"]
    assert len(dest.aborted) == 1 and not port.granted
    assert await gen.outcome() is None  # resumes here
    assert not gen.frozen


async def test_recompute_skips_the_stages() -> None:
    gen = _generation()
    dest = Destination()
    record, _, port = await _run(gen, dest, mode="recompute")
    assert record.outcome is Outcome.MIGRATED and record.mode == "recompute"
    assert dest.staged == [] and port.log == []
    assert dest.committed is not None and dest.committed.num_kv_tokens == 0
    await asyncio.sleep(0)

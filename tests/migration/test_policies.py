"""Migration policies and bookkeeping, pure: request selection, KV versus
recompute, generation segments, destination reservations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infra.contract import SamplingSpec
from infra.records import Priority
from instance.engine import EngineRequest, KvLoad
from instance.generation import Generation
from migration.destination import Inbox, NoRoom
from migration.policies import SELECTION, Movable, choose_mode, select

CANDIDATES = [
    Movable("old-long", Priority.NORMAL, arrival_time=1.0, num_tokens=900, num_remaining=50),
    Movable("new-short", Priority.NORMAL, arrival_time=3.0, num_tokens=40, num_remaining=400),
    Movable("low", Priority.LOW, arrival_time=2.0, num_tokens=300, num_remaining=300),
    Movable("vip", Priority.HIGH, arrival_time=4.0, num_tokens=10, num_remaining=10),
]


def _ids(ms: list[Movable]) -> list[str]:
    return [m.request_id for m in ms]


def test_selection_policies_order_and_spare_high_priority() -> None:
    assert SELECTION.names() == ["lcfs", "lowest-priority", "shortest-remaining"]
    assert SELECTION.default == "lcfs"
    assert _ids(select("lcfs", CANDIDATES, 4)) == ["new-short", "low", "old-long"]
    assert _ids(select("shortest-remaining", CANDIDATES, 1)) == ["old-long"]
    assert _ids(select("lowest-priority", CANDIDATES, 2)) == ["low", "new-short"]
    assert _ids(select("lcfs", CANDIDATES, 1, include_high=True)) == ["vip"]
    with pytest.raises(ValueError, match="unknown selection policy"):
        select("nope", CANDIDATES, 1)


def test_mode_choice() -> None:
    kw: Any = {"kv_available": True, "block_size": 32}
    assert choose_mode("auto", num_tokens=20, **kw) == "recompute"  # < 2 full blocks
    assert choose_mode("auto", num_tokens=200, **kw) == "kv"
    assert choose_mode("kv", num_tokens=20, **kw) == "kv"
    assert choose_mode("recompute", num_tokens=2000, **kw) == "recompute"
    assert choose_mode("kv", num_tokens=2000, kv_available=False, block_size=32) == "recompute"


def _request(max_tokens: int = 100, min_tokens: int = 10) -> EngineRequest:
    sampling = SamplingSpec(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0.0)
    return EngineRequest("r", (1, 2, 3), sampling)


async def test_generation_segments_continue_where_the_last_stopped() -> None:
    gen = Generation(_request(), num_prompt_tokens=3)
    first = gen.next_segment()
    assert first.prompt_token_ids == (1, 2, 3) and first.request_id.startswith("r~1-")
    gen.delivered.extend([7, 8])
    assert gen.freeze() == [1, 2, 3, 7, 8] and gen.frozen
    gen.resume_here()
    assert await gen.outcome() is None and not gen.frozen
    second = gen.next_segment()  # rolled back: continue here from everything so far
    assert second.prompt_token_ids == (1, 2, 3, 7, 8)
    assert second.sampling.max_tokens == 98 and second.sampling.min_tokens == 8
    assert second.request_id != first.request_id


def test_adopted_generation_loads_staged_kv_once() -> None:
    gen = Generation(_request(), num_prompt_tokens=3, earlier_output=(7, 8, 9),
                     kv_load=KvLoad("k", 4))  # fmt: skip
    seg = gen.next_segment()
    assert seg.prompt_token_ids == (1, 2, 3, 7, 8, 9) and seg.kv_transfer == KvLoad("k", 4)
    assert seg.sampling.max_tokens == 97 and gen.num_output == 3
    assert gen.next_segment().kv_transfer is None


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_inbox_reserves_under_a_watermark_and_expires() -> None:
    used = 80
    clock = Clock()
    inbox = Inbox(lambda: 100 - used, None, watermark_blocks=4, timeout_s=10, clock=clock)
    inbox.reserve("a", 10)
    inbox.reserve("a", 12)  # grows to 12 in total, not 22
    assert inbox.reserved_blocks == 12
    with pytest.raises(NoRoom):
        inbox.reserve("b", 5)  # 100 - 80 - 12 - 5 < 4
    assert inbox.in_flight == ["a"]
    clock.now = 11
    await inbox.expire()
    assert inbox.reserved_blocks == 0 and inbox.in_flight == []
    await asyncio.sleep(0)

"""The sim engine's scheduler: block accounting, preemption, priorities, and
agreement between its virtual-time and wall-time drivers."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from infra.contract import SamplingSpec
from infra.records import Priority
from instance.engine import EngineRequest
from instance.sim.core import SimConfig, SimCore
from instance.sim.engine import SimEngine
from instance.sim.latency import LatencyModel
from instance.sim.virtual import run_virtual


def req(rid: str, prompt: int, out: int, prio: Priority = Priority.NORMAL, t: float = 0.0):
    return EngineRequest(
        request_id=rid,
        prompt_token_ids=tuple(range(1, prompt + 1)),
        sampling=SamplingSpec(max_tokens=out),
        priority=prio,
        arrival_time=t,
    )


_op = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(1, 60),
        st.integers(1, 40),
        st.sampled_from(list(Priority)),
    ),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 5)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(_op, max_size=60), num_blocks=st.integers(8, 40), seqs=st.integers(1, 6))
def test_block_accounting_never_leaks_or_goes_negative(ops, num_blocks, seqs) -> None:
    core = SimCore(SimConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=seqs))
    added: list[str] = []
    produced: dict[str, int] = {}
    wanted: dict[str, int] = {}
    for op in ops:
        if op[0] == "add":
            _, prompt, out, prio = op
            rid = f"r{len(added)}"
            if (prompt + out + 3) // 4 > num_blocks:
                continue
            core.add(req(rid, prompt, out, prio, t=len(added)))
            added.append(rid)
            wanted[rid] = out
        elif op[0] == "abort" and added:
            rid = added[op[1] % len(added)]
            if core.abort(rid):
                wanted.pop(rid)
        elif op[0] == "step":
            for _ in range(op[1]):
                for out in core.step().outputs:
                    produced[out.request_id] = produced.get(out.request_id, 0) + 1
                core.check_invariants()
        core.check_invariants()
    for _ in range(10_000):
        if not core.has_work:
            break
        for out in core.step().outputs:
            produced[out.request_id] = produced.get(out.request_id, 0) + 1
        core.check_invariants()
    assert not core.has_work
    assert core.num_free_blocks == num_blocks
    for rid, out in wanted.items():
        assert produced.get(rid, 0) == out, rid


def test_preemption_frees_blocks_of_the_lowest_priority_latest_request() -> None:
    core = SimCore(SimConfig(num_blocks=6, block_size=4, max_num_seqs=4))
    core.add(req("high", 8, 12, Priority.HIGH, t=0))
    core.add(req("low", 8, 12, Priority.LOW, t=1))
    preempted: list[str] = []
    tokens: dict[str, int] = {"high": 0, "low": 0}
    while core.has_work:
        step = core.step()
        preempted.extend(step.preempted)
        for out in step.outputs:
            tokens[out.request_id] += 1
        core.check_invariants()
    assert preempted and set(preempted) == {"low"}
    assert tokens == {"high": 12, "low": 12}
    assert core.num_preempted_total == len(preempted)
    assert core.num_free_blocks == 6


def test_waiting_queue_orders_by_priority_then_arrival() -> None:
    core = SimCore(SimConfig(num_blocks=100, block_size=4, max_num_seqs=1))
    core.add(req("first", 4, 3, Priority.NORMAL, t=0))
    assert core.step().batch == ("first",)
    order = ["first"]
    core.add(req("normal", 4, 2, Priority.NORMAL, t=1))
    core.add(req("low", 4, 2, Priority.LOW, t=2))
    core.add(req("high", 4, 2, Priority.HIGH, t=3))
    while core.has_work:
        for rid in core.step().batch:
            if rid not in order:
                order.append(rid)
    assert order == ["first", "high", "normal", "low"]


def test_load_reports_running_and_head_of_line_demand() -> None:
    core = SimCore(SimConfig(num_blocks=100, block_size=4, max_num_seqs=1))
    core.add(req("a", 8, 5))
    core.add(req("b", 10, 5, t=1))
    core.step()
    load = core.load()
    assert [r.request_id for r in load.running] == ["a"]
    assert load.running[0].num_blocks == 2
    assert [r.request_id for r in load.waiting] == ["b"]
    assert load.waiting[0].num_blocks == 3
    assert load.num_blocks_used == 2


def _workload() -> list[EngineRequest]:
    prios = [Priority.NORMAL, Priority.HIGH, Priority.LOW]
    return [req(f"r{i}", 5 + 7 * i, 3 + 5 * (i % 4), prios[i % 3]) for i in range(12)]


async def test_virtual_time_and_wall_time_runs_agree() -> None:
    config = SimConfig(num_blocks=40, block_size=4, max_num_seqs=4)
    virtual = run_virtual(SimCore(config), _workload())

    fast = SimConfig(num_blocks=40, block_size=4, max_num_seqs=4,
                     latency=LatencyModel().scaled(1000.0))  # fmt: skip
    engine = SimEngine(fast, max_model_len=1000)
    await engine.start()
    try:

        async def collect(r: EngineRequest) -> list[int]:
            return [t for d in [d async for d in engine.generate(r)] for t in d.token_ids]

        # Submit every request before the engine's first step, as the virtual run does.
        tasks = [asyncio.ensure_future(collect(r)) for r in _workload()]
        wall = await asyncio.gather(*tasks)
    finally:
        await engine.stop()
    assert {r.request_id: toks for r, toks in zip(_workload(), wall, strict=True)} == virtual.tokens
    assert engine.steps == virtual.batches
    assert engine.core.num_free_blocks == 40
    assert virtual.end_time_s > 0

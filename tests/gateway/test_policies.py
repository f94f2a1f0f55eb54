"""Dispatch policies are pure functions of a snapshot."""

from __future__ import annotations

import math
import random

import pytest

from gateway.policies import (
    Candidate,
    DispatchContext,
    DispatchRequest,
    make_policy,
)
from gateway.policies.base import DISPATCH
from gateway.view import STALE_REPORT_S, Snapshot
from infra.records import (
    InstanceInfo,
    InstanceStatus,
    InstanceView,
    LoadReport,
    Priority,
    PriorityCounts,
)


def cand(iid: str, *, used: float = 0, running: int = 0, waiting: int = 0, reserved: int = 0,
         total: int = 100) -> Candidate:  # fmt: skip
    batch = running + (1 if waiting else 0)
    free = math.inf if batch == 0 else (total - used) / batch
    if math.isinf(used):
        free = -math.inf
    info = InstanceInfo(
        instance_id=iid, address="http://x", model="m", engine="sim",
        status=InstanceStatus.ACTIVE, pid=1, hostname="h", started_at=0, block_size=16,
        num_blocks_total=total, max_num_seqs=8, max_model_len=1024,
    )  # fmt: skip
    load = LoadReport(
        instance_id=iid, seq=1, timestamp=0, status=InstanceStatus.ACTIVE,
        num_blocks_total=total, num_blocks_used=0 if math.isinf(used) else int(used),
        num_running=running, num_waiting=waiting, num_preempted_total=0,
        running_by_priority=PriorityCounts(), waiting_by_priority=PriorityCounts(),
        virtual_usage=used, freeness=free,
    )  # fmt: skip
    return Candidate(info, load, reserved)


def ctx(*cands: Candidate, tick: int = 0, tokens: int = 64) -> DispatchContext:
    return DispatchContext(DispatchRequest(Priority.NORMAL, tokens), list(cands), tick,
                           random.Random(0))  # fmt: skip


def ids(ranked: list[Candidate]) -> list[str]:
    return [c.instance_id for c in ranked]


def test_registry_lists_the_policies_with_llumnix_default() -> None:
    assert DISPATCH.names() == ["least-load", "llumnix", "random", "round-robin"]
    assert DISPATCH.default == "llumnix"
    with pytest.raises(ValueError, match="unknown dispatch policy 'nope'"):
        make_policy("nope")


def test_llumnix_prefers_the_freest_instance() -> None:
    busy = cand("a", used=80, running=4)
    light = cand("b", used=20, running=2)
    assert ids(make_policy("llumnix").rank(ctx(busy, light))) == ["b", "a"]


def test_llumnix_counts_reservations_not_yet_reported() -> None:
    # Both idle; "a" already has three requests in flight from other gateways.
    a, b = cand("a", reserved=3), cand("b")
    assert ids(make_policy("llumnix").rank(ctx(a, b))) == ["b", "a"]
    # Reservations make an idle instance look used: 1 reservation of 4 blocks.
    a1, b2 = cand("a", reserved=1), cand("b", reserved=2)
    assert ids(make_policy("llumnix").rank(ctx(a1, b2))) == ["a", "b"]


def test_llumnix_puts_draining_instances_last() -> None:
    draining = cand("a", used=math.inf)
    assert ids(make_policy("llumnix").rank(ctx(draining, cand("b", used=90, running=8)))) == [
        "b", "a"]  # fmt: skip


def test_llumnix_spreads_a_burst_when_reservations_accumulate() -> None:
    policy = make_policy("llumnix")
    reserved = {"a": 0, "b": 0, "c": 0}
    for _ in range(30):
        best = policy.rank(ctx(*(cand(i, reserved=n) for i, n in reserved.items())))[0]
        reserved[best.instance_id] += 1
    assert reserved == {"a": 10, "b": 10, "c": 10}


def test_baselines() -> None:
    a, b, c = cand("a", running=3), cand("b", running=1), cand("c", running=2)
    assert ids(make_policy("least-load").rank(ctx(a, b, c))) == ["b", "c", "a"]
    assert ids(make_policy("round-robin").rank(ctx(a, b, c, tick=4))) == ["b", "c", "a"]
    assert sorted(ids(make_policy("random").rank(ctx(a, b, c)))) == ["a", "b", "c"]


def test_an_instance_that_stopped_reporting_is_not_a_candidate() -> None:
    """A dead instance stays registered until its TTL runs out, but its load
    report stops: dispatch skips it once the report falls behind the others."""

    def view(iid: str, reported_at: float) -> InstanceView:
        c = cand(iid)
        return InstanceView(info=c.info, load=c.load.model_copy(update={"timestamp": reported_at}))

    live, dead = view("live", 100.0), view("dead", 100.0 - STALE_REPORT_S - 0.1)
    assert ids(Snapshot((live, dead)).candidates("m", set())) == ["live"]
    recent = view("recent", 100.0 - STALE_REPORT_S + 0.1)
    assert ids(Snapshot((live, recent)).candidates("m", set())) == ["live", "recent"]
    assert ids(Snapshot((dead,)).candidates("m", set())) == ["dead"]  # alone: nothing to judge by

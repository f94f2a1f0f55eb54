"""Llumnix virtual usage and freeness."""

from __future__ import annotations

import math

from infra.records import InstanceStatus, Priority
from instance.engine import EngineLoad, RequestLoad
from instance.load import freeness


def rl(rid: str, blocks: int, prio: Priority = Priority.NORMAL) -> RequestLoad:
    return RequestLoad(rid, prio, 0.0, num_tokens=blocks * 16, num_blocks=blocks)


ACTIVE = InstanceStatus.ACTIVE


def test_idle_instance_is_infinitely_free() -> None:
    f = freeness(EngineLoad(100, 0), status=ACTIVE, headroom_blocks=10)
    assert f.virtual_usage == 0 and math.isinf(f.freeness) and f.freeness > 0


def test_running_blocks_over_batch_size() -> None:
    load = EngineLoad(100, 30, running=(rl("a", 10), rl("b", 20)))
    assert freeness(load, status=ACTIVE, headroom_blocks=10).freeness == (100 - 30) / 2


def test_only_head_of_line_waiting_request_counts() -> None:
    load = EngineLoad(100, 10, running=(rl("a", 10),), waiting=(rl("w1", 40), rl("w2", 50)))
    f = freeness(load, status=ACTIVE, headroom_blocks=0)
    assert f.virtual_usage == 50
    assert f.freeness == (100 - 50) / 2


def test_high_priority_adds_headroom() -> None:
    load = EngineLoad(100, 10, running=(rl("a", 10, Priority.HIGH),))
    assert freeness(load, status=ACTIVE, headroom_blocks=30).virtual_usage == 40


def test_overloaded_instance_has_negative_freeness() -> None:
    load = EngineLoad(100, 100, running=(rl("a", 100),), waiting=(rl("w", 20),))
    assert freeness(load, status=ACTIVE, headroom_blocks=0).freeness < 0


def test_draining_instance_has_infinite_usage() -> None:
    f = freeness(EngineLoad(100, 0), status=InstanceStatus.DRAINING, headroom_blocks=0)
    assert math.isinf(f.virtual_usage) and f.freeness == -math.inf

"""Llumnix load accounting: virtual usage and freeness, as pure functions.

Virtual usage V of a request (Llumnix, OSDI '24, section 4.4.2):

- running request: the blocks it holds, plus a priority headroom when it is
  high priority (so the instance keeps its batch small and decodes fast);
- head-of-line waiting request: its full block demand (it is next to run);
- other waiting requests: 0;
- an instance being drained: a fake request of infinite usage.

Freeness F = (M - sum V) / B with M the KV capacity in blocks and B the batch
size (running requests, counting the head-of-line request when one waits).
F < 0 means overloaded; an idle instance has F = +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infra.records import InstanceStatus, Priority, PriorityCounts
from instance.engine import EngineLoad, RequestLoad


@dataclass(frozen=True)
class LoadFigures:
    virtual_usage: float
    freeness: float


def request_virtual_usage(request: RequestLoad, *, running: bool, headroom_blocks: int) -> float:
    """Virtual usage of one running or head-of-line request."""
    usage = float(request.num_blocks)
    if running and request.priority is Priority.HIGH:
        usage += headroom_blocks
    return usage


def virtual_usage(load: EngineLoad, *, status: InstanceStatus, headroom_blocks: int) -> float:
    if status is InstanceStatus.DRAINING:
        return math.inf
    total = sum(
        request_virtual_usage(r, running=True, headroom_blocks=headroom_blocks)
        for r in load.running
    )
    if load.waiting:
        total += request_virtual_usage(load.waiting[0], running=False, headroom_blocks=0)
    return total


def freeness(load: EngineLoad, *, status: InstanceStatus, headroom_blocks: int) -> LoadFigures:
    """Virtual usage and freeness of an instance."""
    usage = virtual_usage(load, status=status, headroom_blocks=headroom_blocks)
    if math.isinf(usage):
        return LoadFigures(virtual_usage=usage, freeness=-math.inf)
    batch = len(load.running) + (1 if load.waiting else 0)
    if batch == 0:
        return LoadFigures(virtual_usage=usage, freeness=math.inf)
    return LoadFigures(virtual_usage=usage, freeness=(load.num_blocks_total - usage) / batch)


def count_by_priority(requests: tuple[RequestLoad, ...] | list[RequestLoad]) -> PriorityCounts:
    counts = {p: 0 for p in Priority}
    for r in requests:
        counts[r.priority] += 1
    return PriorityCounts(
        high=counts[Priority.HIGH], normal=counts[Priority.NORMAL], low=counts[Priority.LOW]
    )

"""Snapshots for policy tests: instances with a given load, nothing else."""

from __future__ import annotations

import math

from autoscaler.snapshot import InstanceState, Snapshot
from infra.records import InstanceStatus, LoadReport, PriorityCounts

TOTAL = 100


def inst(
    name: str, *, running: int = 0, used: int = 0, high: int = 0, waiting: int = 0,
    status: InstanceStatus = InstanceStatus.ACTIVE,
) -> InstanceState:  # fmt: skip
    """An instance with ``running`` requests using ``used`` of 100 blocks."""
    batch = running + (1 if waiting else 0)
    usage = math.inf if status is InstanceStatus.DRAINING else float(used)
    freeness = (
        -math.inf if math.isinf(usage) else (math.inf if batch == 0 else (TOTAL - used) / batch)
    )
    load = LoadReport(
        instance_id=name, seq=1, timestamp=0.0, status=status, num_blocks_total=TOTAL,
        num_blocks_used=used, num_running=running, num_waiting=waiting, num_preempted_total=0,
        running_by_priority=PriorityCounts(high=high, normal=running - high),
        waiting_by_priority=PriorityCounts(normal=waiting), virtual_usage=usage,
        freeness=freeness,
    )  # fmt: skip
    return InstanceState(name, status, load)


def snap(*instances: InstanceState, now: float = 100.0, held: int = 0,
         migrating: frozenset[str] = frozenset()) -> Snapshot:  # fmt: skip
    return Snapshot(now, tuple(instances), held, migrating)

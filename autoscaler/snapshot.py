"""The autoscaler's view of the cluster at one tick, built by the controller
from Redis (registry, load reports, held demand) and the provider (which
instances it has started). Policies read only this."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from infra.records import InstanceStatus, LoadReport
from infra.traffic import Traffic


@dataclass(frozen=True)
class InstanceState:
    instance_id: str
    status: InstanceStatus
    """``starting`` until the instance has registered and reported."""
    load: LoadReport | None = None
    started_at: float = 0.0
    """When the provider started it (the controller's clock)."""

    @property
    def num_requests(self) -> int:
        return 0 if self.load is None else self.load.num_running + self.load.num_waiting

    @property
    def num_high(self) -> int:
        if self.load is None:
            return 0
        return self.load.running_by_priority.high + self.load.waiting_by_priority.high

    @property
    def freeness(self) -> float:
        """Llumnix freeness, with an idle instance counted as if it ran one
        request (its whole cache free) so averages stay finite."""
        if self.load is None:
            return 0.0
        if math.isinf(self.load.freeness) and self.load.freeness > 0:
            return float(self.load.num_blocks_total)
        return self.load.freeness

    @property
    def usage_fraction(self) -> float:
        if self.load is None or self.load.num_blocks_total == 0:
            return 0.0
        return self.load.num_blocks_used / self.load.num_blocks_total


@dataclass(frozen=True)
class Snapshot:
    now: float
    instances: tuple[InstanceState, ...]
    num_held: int = 0
    """Requests gateways are holding because no instance could take them."""
    migrating: frozenset[str] = field(default_factory=frozenset)
    """Instances with a migration in or out in flight."""
    traffic: Traffic | None = None
    """Arrivals and per-priority latency the gateways recorded (None: not
    known; the ``slo`` policy then sizes by the current load alone)."""

    def with_status(self, *statuses: InstanceStatus) -> list[InstanceState]:
        return [i for i in self.instances if i.status in statuses]

    @property
    def active(self) -> list[InstanceState]:
        return self.with_status(InstanceStatus.ACTIVE)

    @property
    def starting(self) -> list[InstanceState]:
        return self.with_status(InstanceStatus.STARTING)

    @property
    def draining(self) -> list[InstanceState]:
        return self.with_status(InstanceStatus.DRAINING)

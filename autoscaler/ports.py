"""What the controller needs from the world, as small interfaces: the
registry, the demand board, the lease, the event log and the state board.
The Redis classes of ``infra`` (and ``autoscaler.leader``) implement them;
tests hand the controller typed fakes (``tests/autoscaler/test_controller.py``).
The provider (``autoscaler.providers.Provider``) and the instances' HTTP API
(``autoscaler.instances.InstanceApi``) are interfaces of their own."""

from __future__ import annotations

from typing import Protocol

from infra.events import EventPayload
from infra.records import AutoscalerState, InstanceView
from infra.traffic import Traffic


class Registry(Protocol):
    """The instances and their load reports (``infra.store.StateStore``)."""

    async def list_instances(self) -> list[InstanceView]: ...

    async def deregister(self, instance_id: str) -> None: ...


class Demand(Protocol):
    """Requests held at the gateways, models offered (``infra.demand.DemandBoard``)."""

    async def num_held(self, max_age_s: float) -> int: ...

    async def publish_scalable(self, models: list[str], ttl_s: float) -> None: ...


class TrafficSource(Protocol):
    """Arrivals and per-priority latency every gateway recorded
    (``infra.traffic_board.TrafficBoard``)."""

    async def summary(self) -> Traffic: ...


class Lease(Protocol):
    """The leader lease (``autoscaler.leader.LeaderLease``)."""

    @property
    def holder(self) -> str:
        """This autoscaler's id."""
        ...

    async def acquire(self) -> bool: ...

    async def release(self) -> None: ...


class Events(Protocol):
    """The event log (``infra.events.EventLog``)."""

    async def record(self, by: str, payload: EventPayload) -> None: ...


class StateBoard(Protocol):
    """Where the leader's state goes for ``shoal status`` (``infra.status.AutoscalerBoard``)."""

    async def publish(self, state: AutoscalerState, ttl_s: float) -> None: ...

"""Typed decisions: what the policies ask for, what the controller executes
and what the event log records (each as the event of its ``kind``,
``infra.events.DecisionEvent``). Each carries the reason it was taken."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from pydantic import TypeAdapter

from infra.events import DecisionEvent


@dataclass(frozen=True)
class ScaleOut:
    """Start ``count`` new instances."""

    kind: ClassVar[str] = "scale_out"
    count: int
    reason: str


@dataclass(frozen=True)
class Drain:
    """Stop sending new requests to the instance and move its requests away."""

    kind: ClassVar[str] = "drain"
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop an instance that holds no requests (drained, or never used)."""

    kind: ClassVar[str] = "stop"
    instance_id: str
    reason: str


@dataclass(frozen=True)
class StopStarting:
    """Stop an instance that has been starting for longer than the start
    timeout (``ScalingConfig.start_timeout_s``): it will not come up."""

    kind: ClassVar[str] = "start_timeout"
    instance_id: str
    reason: str


@dataclass(frozen=True)
class Migrate:
    """Move up to ``count`` requests from ``source`` to ``destination``."""

    kind: ClassVar[str] = "migrate"
    source: str
    destination: str
    count: int
    reason: str
    selection: str | None = None
    """Request-selection policy on the source (``None``: its default)."""


Decision = ScaleOut | Drain | Stop | StopStarting | Migrate

_EVENT: TypeAdapter[DecisionEvent] = TypeAdapter(DecisionEvent)


def decision_event(decision: Decision, instance_seconds: float) -> DecisionEvent:
    """The event recording ``decision``: its fields, the kind, the cost so far."""
    fields = {**asdict(decision), "kind": decision.kind,
              "instance_seconds": round(instance_seconds, 1)}  # fmt: skip
    return _EVENT.validate_python(fields)

"""Typed decisions: what the policies ask for, what the controller executes
and what the event log records. Each carries the reason it was taken."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ScaleOut:
    """Start ``count`` new instances."""

    count: int
    reason: str


@dataclass(frozen=True)
class Drain:
    """Stop sending new requests to the instance and move its requests away."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop an instance that holds no requests (drained, or never used)."""

    instance_id: str
    reason: str


@dataclass(frozen=True)
class Migrate:
    """Move up to ``count`` requests from ``source`` to ``destination``."""

    source: str
    destination: str
    count: int
    reason: str
    selection: str | None = None
    """Request-selection policy on the source (``None``: its default)."""


Decision = ScaleOut | Drain | Stop | Migrate


def describe(decision: Decision) -> dict[str, Any]:
    """The event-log form: ``{"kind": "scale_out", "count": 1, "reason": ...}``."""
    kind = {ScaleOut: "scale_out", Drain: "drain", Stop: "stop", Migrate: "migrate"}
    return {"kind": kind[type(decision)], **asdict(decision)}

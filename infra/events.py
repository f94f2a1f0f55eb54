"""The event log: every decision the autoscaler takes, and every outcome,
with its reason, in a capped Redis stream (``<ns>:events``), for ``shoal
status`` and operators.

One pydantic model per kind of event (``kind`` tells them apart). A stream
entry has four fields: ``ts`` (Unix time), ``kind``, ``by`` (the autoscaler
that recorded it) and ``data``, the payload's other fields as JSON. Entries
that do not parse as a known kind (written by another version) are skipped
when read."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
    model_validator,
)
from redis.asyncio import Redis

log = logging.getLogger(__name__)


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


class _DecisionPayload(_Payload):
    """A decision of the policies, recorded before it is executed."""

    reason: str
    """Why the policy decided it."""
    instance_seconds: float
    """Instance-seconds (the cost) counted so far by the recording autoscaler."""


class ScaleOutEvent(_DecisionPayload):
    """Start ``count`` instances (each then a ``started`` event)."""

    kind: Literal["scale_out"] = "scale_out"
    count: int


class DrainEvent(_DecisionPayload):
    """Mark the instance ``draining``; its requests then migrate away."""

    kind: Literal["drain"] = "drain"
    instance_id: str


class StopEvent(_DecisionPayload):
    """Stop an instance that holds no requests (drained)."""

    kind: Literal["stop"] = "stop"
    instance_id: str


class StartTimeoutEvent(_DecisionPayload):
    """Stop an instance launched longer than ``start_timeout_s`` ago that is
    still not serving."""

    kind: Literal["start_timeout"] = "start_timeout"
    instance_id: str


class MigrateEvent(_DecisionPayload):
    """Move up to ``count`` requests (outcome: ``migrated`` or ``migration_failed``)."""

    kind: Literal["migrate"] = "migrate"
    source: str
    destination: str
    count: int
    selection: str | None = None
    """Request-selection policy on the source (None: its default)."""


DecisionEvent = Annotated[
    ScaleOutEvent | DrainEvent | StopEvent | StartTimeoutEvent | MigrateEvent,
    Field(discriminator="kind"),
]
"""The event of each kind of decision (``autoscaler.decisions``)."""


class LeaderEvent(_Payload):
    """The recording autoscaler took the lease."""

    kind: Literal["leader"] = "leader"
    reason: str


class StartedEvent(_Payload):
    """The provider launched the instance (not yet serving)."""

    kind: Literal["started"] = "started"
    instance_id: str


class ReadyEvent(_Payload):
    """An instance launched here reported ``active`` for the first time."""

    kind: Literal["ready"] = "ready"
    instance_id: str
    cold_start_s: float
    """From the launch to the first active report."""


class MigratedEvent(_Payload):
    """A ``migrate`` decision's call returned: one outcome per request tried."""

    kind: Literal["migrated"] = "migrated"
    source: str
    destination: str
    outcomes: list[str]
    """``migration.protocol.Outcome`` values (``migrated``, ``refused``, ...)."""
    downtime_ms: list[float | None]
    """Per request, the source's share of its downtime (None: not moved)."""


class MigrationFailedEvent(_Payload):
    """A ``migrate`` decision's call failed (the source did not answer, ...)."""

    kind: Literal["migration_failed"] = "migration_failed"
    source: str
    destination: str
    reason: str


class ErrorEvent(_Payload):
    """Executing a decision failed (its ``decision``), or marking an instance
    draining did (its ``instance_id``)."""

    kind: Literal["error"] = "error"
    reason: str
    decision: DecisionEvent | None = None
    instance_id: str | None = None


EventPayload = Annotated[
    ScaleOutEvent | DrainEvent | StopEvent | StartTimeoutEvent | MigrateEvent | LeaderEvent
    | StartedEvent | ReadyEvent | MigratedEvent | MigrationFailedEvent | ErrorEvent,
    Field(discriminator="kind"),
]  # fmt: skip
"""Any event, told apart by ``kind``."""

_PAYLOAD: TypeAdapter[EventPayload] = TypeAdapter(EventPayload)


class Event(BaseModel):
    """One entry of the log. Serialised flat, as ``shoal status --json``
    prints it: ``{"timestamp", "kind", "by", ...the payload's fields}``, and
    read back from that form too."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    timestamp: float
    by: str
    """The autoscaler that recorded it."""
    payload: EventPayload

    @property
    def kind(self) -> str:
        return self.payload.kind

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        payload = dict(out["payload"])
        return {"timestamp": out["timestamp"], "kind": payload.pop("kind"), "by": out["by"],
                **payload}  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, value: Any) -> Any:
        if isinstance(value, dict) and "payload" not in value:
            rest = dict(value)
            return {"timestamp": rest.pop("timestamp", None), "by": rest.pop("by", None),
                    "payload": rest}  # fmt: skip
        return value


class EventLog:
    def __init__(
        self, redis: Redis, key: str, *, max_len: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._redis = redis
        self.key = key
        self._max_len = max_len
        self._clock = clock

    async def record(self, by: str, payload: EventPayload) -> None:
        fields = {"ts": repr(self._clock()), "kind": payload.kind, "by": by,
                  "data": payload.model_dump_json(exclude={"kind"})}  # fmt: skip
        await self._redis.xadd(self.key, fields, maxlen=self._max_len, approximate=True)  # type: ignore[arg-type]

    async def recent(self, count: int = 20) -> list[Event]:
        """The last ``count`` entries that parse, newest last."""
        rows = await self._redis.xrevrange(self.key, count=count)
        events = []
        for entry_id, raw in reversed(rows or []):
            fields = {_s(k): _s(v) for k, v in (raw or {}).items()}
            event = _decode(fields)
            if event is None:
                log.debug("skipping event %s: not a known kind or shape: %s", entry_id, fields)
            else:
                events.append(event)
        return events


def _decode(fields: dict[str, str]) -> Event | None:
    try:
        payload = _PAYLOAD.validate_python({**json.loads(fields["data"]), "kind": fields["kind"]})
        return Event(timestamp=float(fields["ts"]), by=fields["by"], payload=payload)
    except (KeyError, ValueError, TypeError):  # (a ValidationError is a ValueError)
        return None


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x

"""``shoal status``: a snapshot of the registry, as a table or stable JSON;
and the autoscaler's state record it shows (``<ns>:autoscaler``)."""

from __future__ import annotations

import math
import time

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from infra.embedded_redis import resolve_redis
from infra.events import (
    Event,
    EventLog,
    EventPayload,
    MigratedEvent,
    MigrateEvent,
    MigrationFailedEvent,
    ScaleOutEvent,
)
from infra.keys import KeySchema
from infra.records import AutoscalerState, InstanceView
from infra.settings import CommonSettings
from infra.store import StateStore

STATUS_SCHEMA_VERSION = 1


class AutoscalerBoard:
    """The leading autoscaler's :class:`AutoscalerState` in Redis: written
    every tick with a TTL, so it vanishes when no autoscaler leads."""

    def __init__(self, redis: Redis, keys: KeySchema) -> None:
        self._redis = redis
        self._key = keys.autoscaler

    async def publish(self, state: AutoscalerState, ttl_s: float) -> None:
        await self._redis.set(self._key, state.model_dump_json(), px=max(1, int(ttl_s * 1000)))

    async def read(self) -> AutoscalerState | None:
        raw = await self._redis.get(self._key)
        return None if raw is None else AutoscalerState.model_validate_json(raw)


class ClusterStatus(BaseModel):
    """The JSON printed by ``shoal status --json`` (documented in docs/STATE.md)."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    schema_version: int = STATUS_SCHEMA_VERSION
    timestamp: float
    redis_url: str
    namespace: str
    instances: list[InstanceView]
    autoscaler: AutoscalerState | None = None
    """The active autoscaler's state (leader, migrating instances, held
    requests, instance-seconds), if one runs."""
    events: list[Event] = []
    """Its most recent decisions and outcomes, oldest first (each printed flat:
    timestamp, kind, by, then the payload's fields)."""


async def collect_status(settings: CommonSettings, num_events: int = 8) -> ClusterStatus:
    url, _ = resolve_redis(settings.redis_url, settings.run_dir, start=False)
    if url is None:
        raise ConnectionError(
            "no Redis: SHOAL_REDIS_URL is unset and no embedded server runs in "
            f"{settings.run_dir} (start one with `shoal redis` or `make up`)"
        )
    redis = Redis.from_url(url)
    keys = KeySchema(settings.namespace)
    try:
        views = await StateStore(redis, keys).list_instances()
        autoscaler = await AutoscalerBoard(redis, keys).read()
        events = await EventLog(redis, keys.events).recent(num_events)
    except OSError as exc:
        raise ConnectionError(f"cannot reach Redis at {url}: {exc}") from exc
    finally:
        await redis.aclose()
    return ClusterStatus(
        timestamp=time.time(), redis_url=url, namespace=settings.namespace, instances=views,
        autoscaler=autoscaler, events=events,
    )  # fmt: skip


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.1f}"


def _tokens(n: int) -> str:
    """A token count, short: ``4096``, ``262k``, ``1.5M``."""
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n // 1000}k" if n >= 100_000 else str(n)


def render_table(status: ClusterStatus) -> str:
    header = ("INSTANCE", "STATUS", "ENGINE", "MODEL", "ADDRESS", "RUN", "WAIT",
              "BLOCKS", "KV TOKENS", "FREENESS", "TOK/S", "MIGRATING")  # fmt: skip
    migrating = set(status.autoscaler.migrating if status.autoscaler else [])
    rows = [header]
    for view in status.instances:
        info, load = view.info, view.load
        moving = "yes" if info.instance_id in migrating else "-"
        engine = f"{info.engine}/{info.platform}" if info.platform else info.engine
        capacity = _tokens(info.kv_capacity_tokens or info.num_blocks_total * info.block_size)
        if load is None:
            rows.append((info.instance_id, info.status.value, engine, info.model,
                         info.address, "-", "-", "-", capacity, "-", "-", moving))  # fmt: skip
            continue
        rows.append((
            info.instance_id, load.status.value, engine, info.model, info.address,
            str(load.num_running), str(load.num_waiting),
            f"{load.num_blocks_used}/{load.num_blocks_total}", capacity,
            _fmt(load.freeness), f"{load.generation_tokens_per_s:.0f}", moving,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if not status.instances:
        lines.append("(no instances registered)")
    return "\n".join([*lines, *_render_autoscaler(status)])


def _render_autoscaler(status: ClusterStatus) -> list[str]:
    a = status.autoscaler
    if a is None:
        return ["", "autoscaler: none running"]
    lines = ["", f"autoscaler: {a.leader} ({a.scaling_policy} scaling, "
             f"{a.pairing_policy} pairing); {a.num_held} request(s) held; "
             f"{a.instance_seconds:.0f} instance-seconds so far"]  # fmt: skip
    if status.events:
        lines.append("recent events:")
    for e in status.events:
        when = time.strftime("%H:%M:%S", time.localtime(e.timestamp))
        reason = getattr(e.payload, "reason", "")
        lines.append(f"  {when}  {e.kind:<16} {_subject(e.payload):<24} {reason}")
    return lines


def _subject(p: EventPayload) -> str:
    """What an event is about: an instance, a pair of them, a count."""
    match p:
        case MigrateEvent() | MigratedEvent() | MigrationFailedEvent():
            return f"{p.source} -> {p.destination}"
        case ScaleOutEvent():
            return str(p.count)
    return getattr(p, "instance_id", None) or ""

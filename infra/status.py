"""``shoal status``: a snapshot of the registry, as a table or stable JSON."""

from __future__ import annotations

import math
import time

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from infra.embedded_redis import resolve_redis
from infra.keys import KeySchema
from infra.records import InstanceView
from infra.settings import CommonSettings
from infra.store import StateStore

STATUS_SCHEMA_VERSION = 1


class ClusterStatus(BaseModel):
    """The JSON printed by ``shoal status --json`` (documented in docs/STATE.md)."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    schema_version: int = STATUS_SCHEMA_VERSION
    timestamp: float
    redis_url: str
    namespace: str
    instances: list[InstanceView]


async def collect_status(settings: CommonSettings) -> ClusterStatus:
    url, _ = resolve_redis(settings.redis_url, settings.run_dir, start=False)
    if url is None:
        raise ConnectionError(
            "no Redis: SHOAL_REDIS_URL is unset and no embedded server runs in "
            f"{settings.run_dir} (start one with `shoal redis` or `make up`)"
        )
    redis = Redis.from_url(url)
    try:
        views = await StateStore(redis, KeySchema(settings.namespace)).list_instances()
    except OSError as exc:
        raise ConnectionError(f"cannot reach Redis at {url}: {exc}") from exc
    finally:
        await redis.aclose()
    return ClusterStatus(
        timestamp=time.time(), redis_url=url, namespace=settings.namespace, instances=views
    )


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.1f}"


def render_table(status: ClusterStatus) -> str:
    header = ("INSTANCE", "STATUS", "ENGINE", "MODEL", "ADDRESS", "RUN", "WAIT",
              "BLOCKS", "FREENESS", "TOK/S")  # fmt: skip
    rows = [header]
    for view in status.instances:
        info, load = view.info, view.load
        if load is None:
            rows.append((info.instance_id, info.status.value, info.engine, info.model,
                         info.address, "-", "-", "-", "-", "-"))  # fmt: skip
            continue
        rows.append((
            info.instance_id, load.status.value, info.engine, info.model, info.address,
            str(load.num_running), str(load.num_waiting),
            f"{load.num_blocks_used}/{load.num_blocks_total}",
            _fmt(load.freeness), f"{load.generation_tokens_per_s:.0f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if not status.instances:
        lines.append("(no instances registered)")
    return "\n".join(lines)

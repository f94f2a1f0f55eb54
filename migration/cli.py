"""``shoal migrate --from A --to B [--request ID | --count N]``: ask instance A
to move running requests to B (both named as ``shoal status`` names them),
wait for the outcome and report it."""

from __future__ import annotations

import httpx
from pydantic import TypeAdapter

from infra.settings import CommonSettings
from infra.status import collect_status
from migration.protocol import MigrateRequest, MigrationRecord, Mode

_RECORDS = TypeAdapter(list[MigrationRecord])


class MigrateError(Exception):
    """The migration could not be asked for (unknown instance, refused call)."""


async def migrate(settings: CommonSettings, source: str, destination: str, *,
                  request_ids: list[str] | None, count: int | None, mode: Mode,
                  policy: str | None, timeout_s: float = 600.0,
                  ) -> list[MigrationRecord]:  # fmt: skip
    status = await collect_status(settings)
    addresses = {v.info.instance_id: v.info.address for v in status.instances}
    for name in (source, destination):
        if name not in addresses:
            raise MigrateError(f"no instance {name!r}; registered: {sorted(addresses)}")
    if source == destination:
        raise MigrateError("source and destination are the same instance")
    body = MigrateRequest(destination=addresses[destination], request_ids=request_ids,
                          count=count, mode=mode, policy=policy)  # fmt: skip
    verify = settings.cluster_tls().client_context()
    async with httpx.AsyncClient(timeout=timeout_s, verify=verify) as client:
        resp = await client.post(addresses[source] + "/migrate",
                                 content=body.model_dump_json(exclude_none=True),
                                 headers={"content-type": "application/json",
                                          **settings.cluster_keys().headers()})  # fmt: skip
    if resp.status_code != 200:
        raise MigrateError(f"{source} refused: {resp.status_code} {resp.text}")
    return _RECORDS.validate_json(resp.content)


def render(records: list[MigrationRecord]) -> str:
    if not records:
        return "no request was migrated (nothing running that may move)"
    head = (f"{'request':<40} {'outcome':<16} {'mode':<9} {'stages':>6} {'blocks':>6} "
            f"{'MiB':>7} {'downtime ms':>11}")  # fmt: skip
    rows = [head]
    for r in records:
        down = f"{r.downtime_s * 1000:.1f}" if r.downtime_s is not None else "-"
        rows.append(f"{r.request_id[:40]:<40} {r.outcome.value:<16} {r.mode:<9} {r.stages:>6} "
                    f"{r.blocks:>6} {r.bytes / 2**20:>7.2f} {down:>11}"
                    + (f"  ({r.error})" if r.error else ""))  # fmt: skip
    return "\n".join(rows)

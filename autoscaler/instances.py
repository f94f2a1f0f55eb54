"""The controller's HTTP client to instance workers: mark one draining and
ask one to migrate requests out (``POST /status`` with a ``StatusChange``,
``POST /migrate`` with a ``MigrateRequest``)."""

from __future__ import annotations

from typing import Protocol

import aiohttp

from infra.cluster_auth import ClusterKeys
from infra.records import InstanceStatus, StatusChange
from infra.tls import PLAIN, ClusterTls
from migration.protocol import MigrateRequest, MigrationRecord


class InstanceApi(Protocol):
    async def set_status(self, address: str, status: InstanceStatus) -> None: ...
    async def migrate(self, address: str, body: MigrateRequest) -> list[MigrationRecord]: ...
    async def close(self) -> None: ...


class InstanceCallFailed(Exception):
    """The instance answered with an error or could not be reached."""


class HttpInstanceApi:
    def __init__(self, keys: ClusterKeys, timeout_s: float = 300.0,
                 tls: ClusterTls = PLAIN) -> None:  # fmt: skip
        """``keys``: the cluster credential every call carries; ``tls``: how
        ``https://`` instances are verified."""
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            trust_env=False,
            headers=keys.headers(),
            connector=aiohttp.TCPConnector(ssl=tls.client_context()),
        )

    async def _post(self, url: str, body: dict[str, object]) -> object:
        try:
            async with self._session.post(url, json=body) as resp:
                if resp.status >= 400:
                    raise InstanceCallFailed(f"{url}: {resp.status} {await resp.text()}")
                return await resp.json()
        except aiohttp.ClientError as exc:
            raise InstanceCallFailed(f"{url}: {exc}") from exc

    async def set_status(self, address: str, status: InstanceStatus) -> None:
        await self._post(f"{address}/status", StatusChange(status=status).model_dump(mode="json"))

    async def migrate(self, address: str, body: MigrateRequest) -> list[MigrationRecord]:
        reply = await self._post(f"{address}/migrate", body.model_dump(exclude_none=True))
        assert isinstance(reply, list)
        return [MigrationRecord.model_validate(r) for r in reply]

    async def close(self) -> None:
        await self._session.close()

"""The instance worker as live migration sees it (``migration.routes.MigrationHost``):
the worker's engine, requests and adoption behind the interface migration owns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from infra.contract import GenerateChunk
from infra.records import InstanceStatus
from instance.worker import InstanceWorker
from migration.ports import KvPort
from migration.protocol import ResumeSpec, RunningRequest
from migration.routes import MovableRequest


class WorkerMigrationHost:
    def __init__(self, worker: InstanceWorker) -> None:
        self._worker = worker
        self.metrics = worker.metrics.migration

    @property
    def address(self) -> str:
        return self._worker.config.address

    @property
    def instance_id(self) -> str:
        return self._worker.config.instance_id

    async def peer(self, address: str) -> str | None:
        store, me = self._worker.store, self._worker.config
        if store is None:  # no registry: nothing to check a destination against
            return None
        for view in await store.list_instances():
            info = view.info
            if (info.address == address and info.model == me.served_model_name
                    and info.status is InstanceStatus.ACTIVE):  # fmt: skip
                return info.instance_id
        return None

    @property
    def block_size(self) -> int:
        return self._worker.engine.limits.block_size

    @property
    def kv_port(self) -> KvPort | None:
        return self._worker.engine.kv_port

    def free_blocks(self) -> int:
        load = self._worker.engine.load()
        return load.num_blocks_total - load.num_blocks_used

    def refusal(self) -> str | None:
        w = self._worker
        if w.healthy and w.status is InstanceStatus.ACTIVE:
            return None
        return f"instance is {w.status.value if w.healthy else 'unhealthy'}"

    def movable(self) -> list[MovableRequest]:
        return [g for g in self._worker.generations if g.movable and not g.frozen
                and not g.finished and g.num_remaining > 0]  # fmt: skip

    def running(self) -> list[RunningRequest]:
        return [
            RunningRequest(request_id=g.request_id, engine_request_id=g.engine_request_id,
                           priority=g.priority, num_tokens=len(g.tokens),
                           num_output=g.num_output, migratable=g.movable, frozen=g.frozen)
            for g in self._worker.generations
        ]  # fmt: skip

    @property
    def parked(self) -> list[str]:
        return self._worker.parked

    def resume(self, request_id: str, token: str | None) -> AsyncGenerator[GenerateChunk, None]:
        return self._worker.resume(request_id, token)

    async def adopt(self, spec: ResumeSpec) -> asyncio.Future[bool]:
        return await self._worker.adopt(spec)

    async def abort(self, request_id: str) -> bool:
        return await self._worker.engine.abort(request_id)

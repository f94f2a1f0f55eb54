"""Live migration over HTTP: the operator's ``/migrate`` on a source, the
source-destination handshake (``/migration/*``), ``/resume/{id}`` where the
gateway picks up a migrated stream, and ``/migrations`` (in flight and
history)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from infra.errors import BadRequestError, ServiceUnavailableError
from instance.generation import Generation
from instance.streaming import NDJSON_MEDIA_TYPE, ndjson
from instance.worker import InstanceWorker
from migration.destination import Inbox
from migration.policies import Movable, select, selection_policies
from migration.protocol import (
    AbortMigration,
    CommitReply,
    MigrateRequest,
    MigrationRecord,
    MigrationStatus,
    ReserveRequest,
    ResumeSpec,
    RunningRequest,
    StageReply,
    StageRequest,
)
from migration.source import Refused, migrate_out

log = logging.getLogger(__name__)

HISTORY = 256


class HttpDestination:
    """:class:`migration.source.DestinationApi` over the destination's HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, address: str) -> None:
        self._session = session
        self.address = address.rstrip("/")

    async def _post(self, path: str, body: str) -> bytes:
        headers = {"content-type": "application/json"}
        async with self._session.post(self.address + path, data=body, headers=headers) as resp:
            raw = await resp.read()
            if resp.status == 409:
                raise Refused(raw.decode(errors="replace"))
            if resp.status >= 400:
                raise RuntimeError(f"{path} answered {resp.status}: {raw[:300]!r}")
            return raw

    async def reserve(self, key: str, num_blocks: int) -> None:
        await self._post("/migration/reserve", ReserveRequest(key=key, num_blocks=num_blocks)
                         .model_dump_json())  # fmt: skip

    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int) -> int:  # fmt: skip
        body = StageRequest(key=key, source=source, engine_request_id=engine_request_id,
                            first=first, count=count)  # fmt: skip
        return StageReply.model_validate_json(
            await self._post("/migration/stage", body.model_dump_json())
        ).bytes

    async def commit(self, spec: ResumeSpec) -> CommitReply:
        raw = await self._post("/migration/commit", spec.model_dump_json())
        return CommitReply.model_validate_json(raw)

    async def abort(self, key: str) -> None:
        await self._post("/migration/abort", AbortMigration(key=key).model_dump_json())


class MigrationService:
    def __init__(self, worker: InstanceWorker, *, watermark_blocks: int = 4,
                 timeout_s: float = 30.0) -> None:  # fmt: skip
        self.worker = worker
        self.inbox = Inbox(worker.engine.load, worker.engine.kv_port,
                           watermark_blocks=watermark_blocks, timeout_s=timeout_s)  # fmt: skip
        self.history: collections.deque[MigrationRecord] = collections.deque(maxlen=HISTORY)
        self.outgoing: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=5)
        self._session = aiohttp.ClientSession(timeout=timeout, trust_env=False)

        async def expire() -> None:
            while True:
                await asyncio.sleep(1.0)
                await self.inbox.expire()
                self.worker.metrics.migration_reserved_blocks.set(self.inbox.reserved_blocks)

        task = asyncio.create_task(expire(), name="migration-expiry")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._session.close()

    def _chosen(self, body: MigrateRequest) -> list[Generation]:
        movable = {g.request_id: g for g in self.worker.generations
                   if g.migratable and not g.frozen and not g.finished
                   and g.request_id not in self.outgoing}  # fmt: skip
        if body.request_ids is not None:
            missing = [r for r in body.request_ids if r not in movable]
            if missing:
                raise BadRequestError(f"not migratable here (unknown, finished, not sent by a "
                                      f"gateway, or already moving): {missing}",
                                      param="request_ids")  # fmt: skip
            return [movable[r] for r in body.request_ids]
        if body.policy not in selection_policies():
            raise BadRequestError(f"unknown policy {body.policy!r}; known: "
                                  f"{selection_policies()}", param="policy")  # fmt: skip
        candidates = [
            Movable(g.request_id, g.request.priority, g.request.arrival_time, len(g.tokens),
                    g.request.sampling.max_tokens - g.num_output)
            for g in movable.values()
        ]  # fmt: skip
        chosen = select(body.policy, candidates, body.count or 1, include_high=body.include_high)
        return [movable[m.request_id] for m in chosen]

    async def migrate(self, body: MigrateRequest) -> list[MigrationRecord]:
        assert self._session is not None
        if body.destination.rstrip("/") == self.worker.config.address:
            raise BadRequestError("the destination is this instance", param="destination")
        gens = self._chosen(body)
        destination = HttpDestination(self._session, body.destination)
        engine = self.worker.engine
        records = []
        for gen in gens:
            self.outgoing.add(gen.request_id)
            try:
                record = await migrate_out(
                    gen, source=self.worker.config.address, destination=destination,
                    engine=engine, port=engine.kv_port, block_size=engine.limits.block_size,
                    mode=body.mode,
                )  # fmt: skip
            finally:
                self.outgoing.discard(gen.request_id)
            self._record(record)
            records.append(record)
        return records

    def _record(self, record: MigrationRecord) -> None:
        self.history.append(record)
        m = self.worker.metrics
        m.migrations.labels(record.mode, record.outcome.value).inc()
        m.migration_bytes.inc(record.bytes)
        log.info("migration %s -> %s: %s (%s, %d stages, %d blocks, hand-off after %s s)",
                 record.request_id, record.destination, record.outcome.value, record.mode,
                 record.stages, record.blocks, record.downtime_s)  # fmt: skip


def add_migration_routes(app: FastAPI, service: MigrationService) -> None:
    worker, inbox = service.worker, service.inbox

    @app.post("/migrate", response_model=list[MigrationRecord])
    async def migrate(body: MigrateRequest) -> list[MigrationRecord]:
        return await service.migrate(body)

    @app.get("/requests", response_model=list[RunningRequest])
    async def requests() -> list[RunningRequest]:
        return [
            RunningRequest(request_id=g.request_id, engine_request_id=g.engine_request_id,
                           priority=g.request.priority, num_tokens=len(g.tokens),
                           num_output=g.num_output, migratable=g.migratable, frozen=g.frozen)
            for g in worker.generations
        ]  # fmt: skip

    @app.get("/migrations", response_model=MigrationStatus)
    async def migrations() -> MigrationStatus:
        return MigrationStatus(in_flight=sorted(service.outgoing) + inbox.in_flight,
                               reserved_blocks=inbox.reserved_blocks,
                               parked=worker.parked, history=list(service.history))  # fmt: skip

    @app.get("/migrations/kv")
    async def kv_status() -> dict[str, object]:
        port = worker.engine.kv_port
        if port is None:
            return {"kv_port": None}
        return {"kv_port": port.endpoint, **(await port.status())}

    @app.post("/migration/reserve")
    async def reserve(body: ReserveRequest) -> dict[str, int]:
        _check_serving(worker)
        inbox.reserve(body.key, body.num_blocks)
        return {"reserved_blocks": inbox.reserved_blocks}

    @app.post("/migration/stage", response_model=StageReply)
    async def stage(body: StageRequest) -> StageReply:
        n = await inbox.stage(body.key, body.source, body.engine_request_id, body.first,
                              body.count)  # fmt: skip
        return StageReply(bytes=n)

    @app.post("/migration/commit", response_model=CommitReply)
    async def commit(body: ResumeSpec) -> CommitReply:
        _check_serving(worker)
        return CommitReply(admitted_s=await inbox.commit(body, worker))

    @app.post("/migration/abort")
    async def abort(body: AbortMigration) -> dict[str, bool]:
        await inbox.abort(body.key)
        return {"ok": True}

    @app.get("/resume/{request_id}")
    async def resume(request_id: str) -> StreamingResponse:
        chunks = worker.resume(request_id)
        return StreamingResponse(ndjson(request_id, chunks), media_type=NDJSON_MEDIA_TYPE)


def _check_serving(worker: InstanceWorker) -> None:
    if not worker.healthy or worker.status.value not in ("active",):
        raise ServiceUnavailableError(f"instance is {worker.status.value}: takes no migrations")

"""Live migration over HTTP: the operator's ``/migrate`` on a source, the
source-destination handshake (``/migration/*``), ``/resume/{id}`` where the
gateway picks up a migrated stream, and ``/migrations`` (in flight and
history). They serve any instance that offers a :class:`MigrationHost`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from infra.cluster_auth import RESUME_TOKEN_HEADER, ClusterKeys
from infra.contract import GenerateChunk
from infra.errors import BadRequestError, ServiceUnavailableError
from infra.ndjson import NDJSON_MEDIA_TYPE, ndjson
from infra.records import Priority
from infra.tls import PLAIN, ClusterTls
from migration.destination import Adopter, Inbox
from migration.metrics import MigrationMetrics
from migration.policies import SELECTION, Movable, select
from migration.ports import KvPort
from migration.protocol import (
    AbortMigration,
    AbortReply,
    CommitReply,
    HelloReply,
    HelloRequest,
    KvPortStatus,
    MigrateRequest,
    MigrationRecord,
    MigrationStatus,
    ReserveReply,
    ReserveRequest,
    ResumeSpec,
    RunningRequest,
    StageReply,
    StageRequest,
)
from migration.source import Outgoing, Refused, SourceEngine, migrate_out

log = logging.getLogger(__name__)

HISTORY = 256


class HttpDestination:
    """:class:`migration.source.DestinationApi` over the destination's HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, address: str,
                 instance_id: str) -> None:  # fmt: skip
        """``instance_id``: the instance the registry has at ``address`` (its
        reservation must come from it)."""
        self._session = session
        self.address = address.rstrip("/")
        self.instance_id = instance_id

    async def _post(self, path: str, body: str) -> bytes:
        headers = {"content-type": "application/json"}
        async with self._session.post(self.address + path, data=body, headers=headers) as resp:
            raw = await resp.read()
            if resp.status == 409:
                raise Refused(raw.decode(errors="replace"))
            if resp.status >= 400:
                raise RuntimeError(f"{path} answered {resp.status}: {raw[:300]!r}")
            return raw

    async def verify(self, keys: ClusterKeys) -> None:
        """Check, before anything moves, that the destination is the instance
        the registry has at its address and a member of the cluster (it
        answers a fresh challenge with the cluster secret). Raises :class:`Refused`."""
        nonce = secrets.token_urlsafe(24)
        reply = HelloReply.model_validate_json(
            await self._post("/migration/hello", HelloRequest(nonce=nonce).model_dump_json())
        )
        if reply.instance_id != self.instance_id:
            raise Refused(f"{self.address} is {reply.instance_id!r}, not the registered "
                          f"{self.instance_id!r}")  # fmt: skip
        if not keys.verify_proof(nonce, reply.instance_id, reply.proof):
            raise Refused(f"{self.address} could not prove it is a member of the cluster")

    async def reserve(self, key: str, num_blocks: int) -> None:
        await self._post("/migration/reserve", ReserveRequest(key=key, num_blocks=num_blocks)
                         .model_dump_json())  # fmt: skip

    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int, grant: str) -> int:  # fmt: skip
        body = StageRequest(key=key, source=source, engine_request_id=engine_request_id,
                            first=first, count=count, grant=grant)  # fmt: skip
        return StageReply.model_validate_json(
            await self._post("/migration/stage", body.model_dump_json())
        ).bytes

    async def commit(self, spec: ResumeSpec) -> CommitReply:
        raw = await self._post("/migration/commit", spec.model_dump_json())
        return CommitReply.model_validate_json(raw)

    async def abort(self, key: str) -> None:
        await self._post("/migration/abort", AbortMigration(key=key).model_dump_json())


class MovableRequest(Outgoing, Protocol):
    """A request that may move, with what the selection policies weigh."""

    @property
    def priority(self) -> Priority: ...

    @property
    def arrival_time(self) -> float: ...


class MigrationHost(Adopter, SourceEngine, Protocol):
    """What an instance offers migration: its address and KV, the requests
    that may move out, and the adoption of those that move in."""

    metrics: MigrationMetrics

    @property
    def address(self) -> str: ...

    @property
    def block_size(self) -> int: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def kv_port(self) -> KvPort | None: ...

    async def peer(self, address: str) -> str | None:
        """The id of the instance registered at ``address`` if it is an active
        instance of this one's model, else None (no migration goes there)."""
        ...

    def free_blocks(self) -> int:
        """KV blocks free in the engine now (reservations not counted)."""
        ...

    def refusal(self) -> str | None:
        """Why the instance takes no migrations in now, or None if it does."""
        ...

    def movable(self) -> list[MovableRequest]:
        """Requests that may move out (sent by a gateway, neither frozen nor done)."""
        ...

    def running(self) -> list[RunningRequest]: ...

    @property
    def parked(self) -> list[str]:
        """Migrated-in requests whose client has not resumed them yet."""
        ...

    def resume(self, request_id: str, token: str | None) -> AsyncGenerator[GenerateChunk, None]:
        """The chunks of a parked request, for the holder of its resume token."""
        ...


class MigrationService:
    def __init__(self, host: MigrationHost, *, keys: ClusterKeys, watermark_blocks: int = 4,
                 timeout_s: float = 30.0, tls: ClusterTls = PLAIN) -> None:  # fmt: skip
        """``keys``: the cluster credential its calls to destinations carry;
        ``tls``: how ``https://`` destinations are verified."""
        self.host = host
        self.keys = keys
        self.tls = tls
        self.inbox = Inbox(host.free_blocks, host.kv_port, watermark_blocks=watermark_blocks,
                           timeout_s=timeout_s, on_arrival=host.metrics.arrived)  # fmt: skip
        self.history: collections.deque[MigrationRecord] = collections.deque(maxlen=HISTORY)
        self.outgoing: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=5)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            trust_env=False,
            headers=self.keys.headers(),
            connector=aiohttp.TCPConnector(ssl=self.tls.client_context()),
        )

        async def expire() -> None:
            while True:
                await asyncio.sleep(1.0)
                await self.inbox.expire()
                self.host.metrics.reserved_blocks.set(self.inbox.reserved_blocks)

        task = asyncio.create_task(expire(), name="migration-expiry")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._session.close()

    def _chosen(self, body: MigrateRequest) -> list[MovableRequest]:
        movable = {g.request_id: g for g in self.host.movable()
                   if g.request_id not in self.outgoing}  # fmt: skip
        if body.request_ids is not None:
            missing = [r for r in body.request_ids if r not in movable]
            if missing:
                raise BadRequestError(f"not migratable here (unknown, finished, not sent by a "
                                      f"gateway, or already moving): {missing}",
                                      param="request_ids")  # fmt: skip
            return [movable[r] for r in body.request_ids]
        if body.policy is not None and body.policy not in SELECTION.names():
            raise BadRequestError(f"unknown policy {body.policy!r}; known: "
                                  f"{SELECTION.names()}", param="policy")  # fmt: skip
        candidates = [Movable(g.request_id, g.priority, g.arrival_time, len(g.tokens),
                              g.num_remaining) for g in movable.values()]  # fmt: skip
        chosen = select(body.policy, candidates, body.count or 1, include_high=body.include_high)
        return [movable[m.request_id] for m in chosen]

    async def migrate(self, body: MigrateRequest) -> list[MigrationRecord]:
        assert self._session is not None
        host = self.host
        if body.destination.rstrip("/") == host.address:
            raise BadRequestError("the destination is this instance", param="destination")
        gens = self._chosen(body)
        # Claimed before the first await: a concurrent /migrate must not choose them too.
        claimed = {g.request_id for g in gens}
        self.outgoing |= claimed
        try:
            destination = await self._verified(body.destination.rstrip("/"))
            records = []
            for gen in gens:
                record = await migrate_out(
                    gen, source=host.address, destination=destination, engine=host,
                    port=host.kv_port, block_size=host.block_size, mode=body.mode,
                )  # fmt: skip
                self.outgoing.discard(gen.request_id)
                self._record(record)
                records.append(record)
            return records
        finally:
            self.outgoing -= claimed

    async def _verified(self, address: str) -> HttpDestination:
        """The destination at ``address`` once the registry has it as an active
        instance of this model and it has answered the cluster's challenge."""
        assert self._session is not None
        peer = await self.host.peer(address)
        if peer is None:
            raise BadRequestError("the destination is not an active instance of this model in "
                                  "the registry", param="destination")  # fmt: skip
        destination = HttpDestination(self._session, address, peer)
        try:
            await destination.verify(self.keys)
        except (Refused, RuntimeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BadRequestError(f"the destination was not verified, nothing moved: {exc}",
                                  param="destination") from exc  # fmt: skip
        return destination

    def _record(self, record: MigrationRecord) -> None:
        self.history.append(record)
        m = self.host.metrics
        m.migrations.labels(record.mode, record.outcome.value).inc()
        m.bytes.inc(record.bytes)
        log.info("migration %s -> %s: %s (%s, %d stages, %d blocks, hand-off after %s s)",
                 record.request_id, record.destination, record.outcome.value, record.mode,
                 record.stages, record.blocks, record.downtime_s)  # fmt: skip


def add_migration_routes(app: FastAPI, service: MigrationService) -> None:
    host, inbox = service.host, service.inbox

    @app.post("/migrate", response_model=list[MigrationRecord])
    async def migrate(body: MigrateRequest) -> list[MigrationRecord]:
        return await service.migrate(body)

    @app.get("/requests", response_model=list[RunningRequest])
    async def requests() -> list[RunningRequest]:
        return host.running()

    @app.get("/migrations", response_model=MigrationStatus)
    async def migrations() -> MigrationStatus:
        return MigrationStatus(in_flight=sorted(service.outgoing) + inbox.in_flight,
                               reserved_blocks=inbox.reserved_blocks,
                               parked=host.parked, history=list(service.history),
                               arrivals=list(inbox.arrivals))  # fmt: skip

    @app.get("/migrations/kv", response_model=KvPortStatus)
    async def kv_status() -> KvPortStatus:
        port = host.kv_port
        if port is None:
            return KvPortStatus(kv_port=None)
        return KvPortStatus(kv_port=port.endpoint, **(await port.status()).model_dump())

    @app.post("/migration/reserve", response_model=ReserveReply)
    async def reserve(body: ReserveRequest) -> ReserveReply:
        _check_serving(host)
        inbox.reserve(body.key, body.num_blocks)
        return ReserveReply(reserved_blocks=inbox.reserved_blocks)

    @app.post("/migration/hello", response_model=HelloReply)
    async def hello(body: HelloRequest) -> HelloReply:
        me = host.instance_id
        return HelloReply(instance_id=me, proof=service.keys.prove(body.nonce, me))

    @app.post("/migration/stage", response_model=StageReply)
    async def stage(body: StageRequest) -> StageReply:
        n = await inbox.stage(body.key, body.source, body.engine_request_id, body.first,
                              body.count, body.grant)  # fmt: skip
        return StageReply(bytes=n)

    @app.post("/migration/commit", response_model=CommitReply)
    async def commit(body: ResumeSpec) -> CommitReply:
        _check_serving(host)
        return await inbox.commit(body, host)

    @app.post("/migration/abort", response_model=AbortReply)
    async def abort(body: AbortMigration) -> AbortReply:
        await inbox.abort(body.key)
        return AbortReply()

    @app.get("/resume/{request_id}")
    async def resume(request_id: str, request: Request) -> StreamingResponse:
        chunks = host.resume(request_id, request.headers.get(RESUME_TOKEN_HEADER))
        return StreamingResponse(ndjson(request_id, chunks), media_type=NDJSON_MEDIA_TYPE)


def _check_serving(host: MigrationHost) -> None:
    refusal = host.refusal()
    if refusal is not None:
        raise ServiceUnavailableError(f"takes no migrations: {refusal}")

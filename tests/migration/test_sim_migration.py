"""Live migration by KV transfer between sim engines: the sim's KV port runs
the real source algorithm (``migrate_out``) and destination (``Inbox``)
unchanged. Checked: pins keep an aborted request's blocks (honest free-block
accounting), staged KV skips prefill on the destination, the transfer time
follows the bandwidth model, reads of requests without KV fail cleanly, and
two sim worker processes migrate a stream over HTTP by KV."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.cluster_auth import RESUME_TOKEN_HEADER, ClusterKeys
from infra.contract import GenerateChunk, SamplingSpec
from infra.errors import BadRequestError
from infra.records import Priority
from infra.telemetry import new_registry
from instance.engine import EngineRequest, KvLoad
from instance.generation import Generation
from instance.metrics import InstanceMetrics
from instance.migration_host import WorkerMigrationHost
from instance.reporter import ReporterConfig
from instance.sim.core import SimConfig, SimCore
from instance.sim.engine import SimEngine
from instance.sim.kv import KvTransferModel, SimKvOptions, SimKvPort
from instance.sim.latency import LatencyModel
from instance.worker import InstanceWorker, WorkerConfig
from migration.destination import Inbox, NoRoom
from migration.ports import KvStatus
from migration.protocol import CommitReply, MigrateRequest, MigrationRecord, Outcome, ResumeSpec
from migration.routes import MigrationService
from migration.source import Refused, migrate_out
from migration.wire import BlocksRead, Endpoint, ReadBlocks, WireError, call
from tests.helpers import WorkerProcess, start_worker, wait_for

BS = 4
GRANT = "a-migrations-read-grant"
LINK = KvTransferModel(bytes_per_token=1000, bandwidth_bytes_per_s=1e6, latency_s=0.5)
"""Round numbers: 4,000 bytes and 4 ms per block, plus 0.5 s per stage. The
sleeps are recorded, not waited, so the model's size does not slow the test."""


def _req(rid: str, prompt: int, out: int, kv: KvLoad | None = None) -> EngineRequest:
    return EngineRequest(rid, tuple(range(1, prompt + 1)), SamplingSpec(max_tokens=out),
                         kv_transfer=kv)  # fmt: skip


# -- the core: pins, staging, loads (pure) ---------------------------------------
def test_pinned_request_keeps_its_blocks_after_abort_until_unpinned() -> None:
    core = SimCore(SimConfig(num_blocks=20, block_size=BS, max_num_seqs=2))
    core.add(_req("r", 10, 50))
    for _ in range(5):
        core.step()  # 10 prompt + 5 output tokens: 14 computed, 3 full blocks
    assert core.num_full_blocks("r") == 3
    core.pin("r")
    assert core.abort("r")
    core.check_invariants()
    assert core.num_free_blocks == 20 - 4 and core.held == ["r"] and not core.has_work
    assert core.num_full_blocks("r") == 3  # still readable: the final stage needs it
    assert core.load().num_blocks_used == 4 and core.load().running == ()
    core.unpin("r")
    core.check_invariants()
    assert core.num_free_blocks == 20 and core.held == [] and core.pinned == []
    assert core.num_full_blocks("r") is None


def test_unpinned_waiting_or_unknown_requests_have_no_readable_blocks() -> None:
    core = SimCore(SimConfig(num_blocks=20, block_size=BS, max_num_seqs=1))
    core.add(_req("running", 9, 20))
    core.add(_req("waiting", 9, 20))
    core.step()
    assert core.num_full_blocks("running") == 2  # 9 computed tokens
    assert core.num_full_blocks("waiting") is None
    assert core.num_full_blocks("unknown") is None
    core.abort("running")  # not pinned: freed at once
    assert core.num_full_blocks("running") is None and core.held == []


@pytest.mark.parametrize(
    ("staged", "loaded_tokens"),
    [((0, 3), 12), ((0, 2), 8), ((1, 2), 0), (None, 0)],
    ids=["all", "prefix", "gap-at-block-0", "not-staged"],
)
def test_staged_kv_skips_prefill_else_recomputes(
    staged: tuple[int, int] | None, loaded_tokens: int
) -> None:
    core = SimCore(SimConfig(num_blocks=20, block_size=BS, max_num_seqs=2))
    if staged is not None:
        core.stage("k", *staged)
    core.add(_req("m", 14, 5, kv=KvLoad("k", 12)))  # a migrated request: 3 full blocks sent
    step = core.step()
    assert step.num_prefill_tokens == 14 - loaded_tokens
    assert core.num_loaded_blocks_total == loaded_tokens // BS
    assert core.staging == {}  # consumed by the load (or never there)
    core.check_invariants()


def test_preempted_migrated_request_recomputes_everything() -> None:
    core = SimCore(SimConfig(num_blocks=6, block_size=BS, max_num_seqs=2))
    core.stage("k", 0, 2)
    core.add(_req("m", 9, 12, kv=KvLoad("k", 8)))
    assert core.step().num_prefill_tokens == 1
    core.add(EngineRequest("high", (1, 2, 3), SamplingSpec(max_tokens=12), Priority.HIGH))
    context_at_preemption: int | None = None
    while core.has_work:
        step = core.step()
        core.check_invariants()
        if "m" in step.preempted:
            (m,) = [r for r in core.load().waiting if r.request_id == "m"]
            context_at_preemption = m.num_tokens
        elif context_at_preemption is not None and "m" in step.batch:
            assert step.num_prefill_tokens == context_at_preemption  # the KV is gone
            break
    assert context_at_preemption is not None
    assert core.num_loaded_blocks_total == 2  # loaded once, at the first admission


# -- the port in-process ---------------------------------------------------------
@dataclass
class Recorder:
    """An injected sleep that records and returns at once (after ``during``,
    which stands for whatever happens elsewhere while the time passes)."""

    calls: list[float] = field(default_factory=list)
    during: Callable[[int], Awaitable[None]] | None = None

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.during is not None:
            await self.during(len(self.calls))
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def _port(core: SimCore, **kw: Any) -> AsyncIterator[SimKvPort]:
    port = SimKvPort(core, SimKvOptions("127.0.0.1:0", LINK), **kw)
    await port.start()
    try:
        yield port
    finally:
        await port.stop()


async def test_stage_reads_the_source_and_waits_the_modelled_transfer_time() -> None:
    src_core = SimCore(SimConfig(num_blocks=20, block_size=BS))
    dst_core = SimCore(SimConfig(num_blocks=20, block_size=BS))
    src_core.add(_req("r", 13, 50))
    src_core.step()  # 13 computed tokens: 3 full blocks
    sleep = Recorder()
    async with _port(src_core) as src, _port(dst_core, sleep=sleep) as dst:
        await src.grant("r", GRANT)
        await src.grant("nope", GRANT)
        with pytest.raises(WireError, match="not granted"):
            await dst.stage("k", src.endpoint, "r", 0, 2, "another-migrations-grant")
        assert (await src.status()).not_granted == 1
        assert await dst.stage("k", src.endpoint, "r", 0, 2, GRANT) == 2 * 4000
        assert await dst.stage("k", src.endpoint, "r", 2, 1, GRANT) == 4000
        assert sleep.calls == [pytest.approx(0.5 + 0.008), pytest.approx(0.5 + 0.004)]
        assert (await dst.status()).staging == {"k": 3}
        with pytest.raises(WireError, match="3 full blocks"):
            await dst.stage("k", src.endpoint, "r", 2, 2, GRANT)  # block 3 is still filling
        with pytest.raises(WireError, match="holds no KV"):
            await dst.stage("k2", src.endpoint, "nope", 0, 1, GRANT)
        assert len(sleep.calls) == 2  # failed reads move nothing
        await dst.drop("k")
        # The blocking client of migration.wire speaks to the sim port too.
        read = ReadBlocks(request_id="r", first=0, count=3, grant=GRANT)
        reply, payload = await asyncio.to_thread(call, Endpoint.parse(src.endpoint), read,
                                                 BlocksRead)  # fmt: skip
        assert reply.bytes == 3 * 4000 and payload == b""
        status = await dst.status()
        assert status == KvStatus(block_bytes=4000)  # all empty
        await src.revoke("r")
        with pytest.raises(WireError, match="not granted"):
            await dst.stage("k", src.endpoint, "r", 0, 2, GRANT)  # that migration ended


async def test_a_pin_expires_after_its_ttl() -> None:
    core = SimCore(SimConfig(num_blocks=20, block_size=BS))
    core.add(_req("r", 10, 50))
    core.step()
    now = [100.0]
    port = SimKvPort(core, SimKvOptions("127.0.0.1:0", LINK, pin_ttl_s=60), clock=lambda: now[0])
    await port.pin("r")
    core.abort("r")
    now[0] += 59
    port.expire_pins()
    assert core.held == ["r"]
    now[0] += 2
    port.expire_pins()
    assert core.held == [] and core.pinned == [] and core.num_free_blocks == 20


# -- migrate_out between two in-process sim workers ------------------------------
class InboxDestination:
    """:class:`migration.source.DestinationApi` straight onto a worker's Inbox
    (the HTTP routes, minus HTTP)."""

    def __init__(self, worker: InstanceWorker) -> None:
        self.worker = worker
        self.address = worker.config.address
        self.host = WorkerMigrationHost(worker)
        self.inbox = Inbox(self.host.free_blocks, self.host.kv_port)

    async def reserve(self, key: str, num_blocks: int) -> None:
        try:
            self.inbox.reserve(key, num_blocks)
        except NoRoom as exc:
            raise Refused(str(exc)) from exc

    async def stage(self, key: str, source: str, engine_request_id: str, first: int,
                    count: int, grant: str) -> int:  # fmt: skip
        return await self.inbox.stage(key, source, engine_request_id, first, count, grant)

    async def commit(self, spec: ResumeSpec) -> CommitReply:
        return await self.inbox.commit(spec, self.host)

    async def abort(self, key: str) -> None:
        await self.inbox.abort(key)


@dataclass
class Sim:
    worker: InstanceWorker
    engine: SimEngine
    steps: Recorder
    transfers: Recorder

    @property
    def port(self) -> SimKvPort:
        assert self.engine.kv_port is not None
        return self.engine.kv_port


@contextlib.asynccontextmanager
async def _sim(name: str, *, speedup: float, max_num_seqs: int = 4,
               resume_timeout_s: float = 60.0) -> AsyncIterator[Sim]:  # fmt: skip
    latency = LatencyModel().scaled(speedup)
    steps, transfers = Recorder(), Recorder()

    async def step_sleep(seconds: float) -> None:
        steps.calls.append(seconds)
        await asyncio.sleep(seconds)

    engine = SimEngine(
        SimConfig(num_blocks=1024, block_size=BS, max_num_seqs=max_num_seqs, latency=latency),
        max_model_len=4096, sleep=step_sleep, kv=SimKvOptions("127.0.0.1:0", LINK),
        kv_sleep=transfers,
    )  # fmt: skip
    config = WorkerConfig(
        instance_id=name, address=f"http://{name}", served_model_name="sim", vocab_size=256,
        report=ReporterConfig(interval_s=0.05, ttl_s=5), resume_timeout_s=resume_timeout_s,
    )  # fmt: skip
    worker = InstanceWorker(engine, config, None, InstanceMetrics(new_registry()))
    await worker.start()
    try:
        yield Sim(worker, engine, steps, transfers)
    finally:
        await worker.stop()


async def _drain(chunks: Any) -> list[GenerateChunk]:
    return [c async for c in chunks]


OWNER = "the-owners-resume-token"
"""The resume token of the tests' migrated requests (their gateway's secret)."""


def _source_gen(rid: str, prompt: int, max_tokens: int) -> tuple[EngineRequest, Generation]:
    request = _req(rid, prompt, max_tokens)
    return request, Generation(request, num_prompt_tokens=prompt, migratable=True,
                               resume_token=OWNER)  # fmt: skip


async def _until(predicate: Any, timeout_s: float = 30.0) -> None:
    """A bound on waiting (not a performance assertion)."""
    interval_s = 0.005
    for _ in range(int(timeout_s / interval_s)):
        if predicate():
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


async def _migrate(src: Sim, dst: Sim, gen: Generation, port: SimKvPort) -> MigrationRecord:
    return await migrate_out(gen, source=src.worker.config.address,
                             destination=InboxDestination(dst.worker), engine=src.engine,
                             port=port, block_size=BS, mode="kv")  # fmt: skip


def _idle(sim: Sim) -> bool:
    core = sim.engine.core
    return (not core.pinned and not core.held and not core.staging and not core.has_work
            and core.num_free_blocks == core.config.num_blocks)  # fmt: skip


class GatedHost(WorkerMigrationHost):
    """A source host whose registry look-up waits for the test: the first
    ``/migrate`` holds there while a second one asks."""

    def __init__(self, worker: InstanceWorker) -> None:
        super().__init__(worker)
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def peer(self, address: str) -> str | None:
        self.asked.set()
        await self.answer.wait()
        return None  # not registered: the first move ends in a 400, nothing moved


async def test_a_request_being_moved_is_not_chosen_by_a_concurrent_migrate() -> None:
    async with _sim("src", speedup=20) as src:
        request, gen = _source_gen("r-twice", prompt=30, max_tokens=1500)
        stream = asyncio.ensure_future(_drain(src.worker.run(request, gen, migratable=True)))
        await _until(lambda: gen.num_output > 4)
        host = GatedHost(src.worker)
        service = MigrationService(host, keys=ClusterKeys.of("s" * 32))
        body = MigrateRequest(destination="http://dst", request_ids=["r-twice"])
        async with service.running():
            first = asyncio.ensure_future(service.migrate(body))
            await host.asked.wait()
            with pytest.raises(BadRequestError, match="already moving"):
                await asyncio.wait_for(service.migrate(body), 30)  # (a bound: no hang if not)
            host.answer.set()
            with pytest.raises(BadRequestError, match="not an active instance"):
                await first
            assert service.outgoing == set()  # the claim ends with the move
            assert [g.request_id for g in host.movable()] == ["r-twice"]
        await src.engine.abort(gen.engine_request_id)
        await stream


async def test_migrate_out_between_sim_engines_moves_kv_and_skips_prefill() -> None:
    async with _sim("src", speedup=20) as src, _sim("dst", speedup=1000) as dst:
        request, gen = _source_gen("r1", prompt=30, max_tokens=1500)
        stream = asyncio.ensure_future(_drain(src.worker.run(request, gen, migratable=True)))
        await _until(lambda: len(gen.delivered) >= 40)

        async def decode_meanwhile(stage: int) -> None:
            if stage == 1:  # the source decodes 3 more blocks during stage 1's copy
                target = len(gen.delivered) + 3 * BS
                await _until(lambda: len(gen.delivered) >= target)

        dst.transfers.during = decode_meanwhile
        record = await _migrate(src, dst, gen, src.port)
        assert record.outcome is Outcome.MIGRATED and record.mode == "kv", record
        assert record.stages >= 2  # stage 2 copied what stage 1's time produced
        here = await stream
        assert here[-1].migrated_to == dst.worker.config.address
        moved = dst.worker.generation("r1")
        assert moved is not None
        context = len(request.prompt_token_ids) + len(moved.earlier_output)
        rest = await _drain(dst.worker.resume("r1", OWNER))
        # Every full block of the frozen context crossed over, and nothing else.
        assert record.blocks == (context - 1) // BS
        assert record.bytes == record.blocks * BS * LINK.bytes_per_token
        # Each stage waited latency + its bytes / bandwidth (whole blocks of
        # 4 ms); together they cover the record's bytes.
        waits = dst.transfers.calls
        assert 1 <= len(waits) <= record.stages
        per_block = BS * LINK.bytes_per_token / LINK.bandwidth_bytes_per_s
        for wait in waits:
            blocks = (wait - LINK.latency_s) / per_block
            assert blocks >= 1 and blocks == pytest.approx(round(blocks))
        assert sum(waits) == pytest.approx(
            len(waits) * LINK.latency_s + record.bytes / LINK.bandwidth_bytes_per_s
        )
        assert src.transfers.calls == []  # the destination pulls; the source only serves
        # B loaded the blocks: its first step prefilled only the tail.
        assert dst.engine.core.num_loaded_blocks_total == record.blocks
        tail = context - record.blocks * BS
        assert 1 <= tail <= BS
        first = dst.engine.core.config.latency.step_duration_s(
            num_prefill_tokens=tail, num_decode_seqs=0, num_context_tokens=0
        )
        assert dst.steps.calls[0] == pytest.approx(first)
        output = [t for c in here + rest for t in c.token_ids]
        assert len(output) == 1500 and rest[-1].finish_reason == "length"
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 1500
        await _until(lambda: _idle(src) and _idle(dst))


async def test_a_waiting_request_moves_by_recompute_even_when_kv_is_asked() -> None:
    """A waiting request holds no KV: asked to move by KV, it moves by
    recompute (no stage, nothing read), and the client still gets it all."""
    async with _sim("src", speedup=20, max_num_seqs=1) as src, _sim("dst", speedup=1000) as dst:
        hog_request, hog = _source_gen("hog", prompt=10, max_tokens=300)
        request, gen = _source_gen("r2", prompt=30, max_tokens=200)
        hog_stream = asyncio.ensure_future(_drain(src.worker.run(hog_request, hog)))
        stream = asyncio.ensure_future(_drain(src.worker.run(request, gen, migratable=True)))
        await _until(lambda: any(r.request_id == gen.engine_request_id
                                 for r in src.engine.load().waiting))  # fmt: skip
        assert not gen.holds_kv
        record = await _migrate(src, dst, gen, src.port)
        assert record.outcome is Outcome.MIGRATED and record.mode == "recompute", record
        assert record.blocks == 0 and record.bytes == 0 and dst.transfers.calls == []
        here = await stream
        rest = await _drain(dst.worker.resume("r2", OWNER))
        assert sum(len(c.token_ids) for c in here + rest) == 200
        assert rest[-1].finish_reason == "length"
        assert len(await hog_stream) > 0
        await _until(lambda: _idle(src) and _idle(dst))


# -- two sim worker processes over HTTP ------------------------------------------
NAMESPACE = f"simmig-{uuid.uuid4().hex[:6]}"
MAX_TOKENS = 1500
PROMPT = "migrate me, " * 4


@pytest.fixture(scope="module")
def pair(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    log_dir = tmp_path_factory.mktemp("sim-migration")
    workers: list[WorkerProcess] = []
    try:
        for name in ("sim-mig-a", "sim-mig-b"):
            workers.append(start_worker(
                engine="sim", redis_url=redis_url, namespace=NAMESPACE, log_dir=log_dir,
                instance_id=name, ready_timeout_s=60,
                # 10x the A10 model: ~2.5 ms per decode step, a 1,500-token
                # request takes ~4 s on one instance.
                args=["--sim-speedup", "10", "--max-model-len", "2048",
                      "--num-sim-blocks", "512"],
            ))  # fmt: skip
        yield workers[0], workers[1]
    finally:
        for w in workers:
            w.stop()


def _get(w: WorkerProcess, path: str) -> Any:
    return httpx.get(w.base_url + path, timeout=10).json()


def _http_idle(w: WorkerProcess) -> bool:
    kv, status, load = _get(w, "/migrations/kv"), _get(w, "/migrations"), _get(w, "/load")
    return bool(
        not kv["pinned"] and not kv["delayed"] and not kv["staging"]
        and status["reserved_blocks"] == 0 and not status["in_flight"]
        and load["num_running"] == 0 and load["num_waiting"] == 0
        and load["num_blocks_used"] == 0 and not _get(w, "/requests")
    )  # fmt: skip


def _lines(client: httpx.Client, method: str, url: str, body: Any = None) -> Iterator[Any]:
    """A stream's chunks; the tests' gateway, it resumes with its token."""
    headers = {RESUME_TOKEN_HEADER: OWNER}
    with client.stream(method, url, json=body, timeout=60, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line:
                yield json.loads(line)


def test_sim_workers_migrate_a_stream_by_kv_over_http(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    a, b = pair
    assert _get(a, "/migrations/kv")["kv_port"] and _get(b, "/migrations/kv")["kv_port"]
    loaded_before = _get(b, "/migrations/kv")["loaded_blocks"]
    rid = f"sim-kv-{uuid.uuid4().hex[:6]}"
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "migratable": True,
            "request_id": rid, "resume_token": OWNER}  # fmt: skip
    tokens: list[int] = []
    hops = [a.base_url]
    last: dict[str, Any] = {}
    with httpx.Client() as client:
        lines = _lines(client, "POST", a.base_url + "/generate", body)
        while len(tokens) < 40:
            tokens.extend(next(lines).get("token_ids", []))
        move = {"destination": b.base_url, "request_ids": [rid], "mode": "kv"}
        resp = httpx.post(a.base_url + "/migrate", json=move, timeout=60)
        assert resp.status_code == 200, resp.text
        (record,) = resp.json()
        assert record["outcome"] == "migrated" and record["mode"] == "kv", record
        for chunk in lines:
            if chunk.get("migrated_to"):
                hops.append(chunk["migrated_to"])
                lines = _lines(client, "GET", f"{chunk['migrated_to']}/resume/{rid}")
                break
            tokens.extend(chunk.get("token_ids", []))
        for chunk in lines:
            assert chunk.get("error") is None, chunk
            tokens.extend(chunk.get("token_ids", []))
            last = chunk
    assert hops == [a.base_url, b.base_url]
    assert record["blocks"] > 0 and record["bytes"] == record["blocks"] * 16 * 2 * 32 * 4096 * 2
    assert record["downtime_s"] is not None and record["downtime_s"] > 0
    assert _get(b, "/migrations/kv")["loaded_blocks"] - loaded_before == record["blocks"]
    assert len(tokens) == MAX_TOKENS and last["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == MAX_TOKENS
    for w in (a, b):
        wait_for(lambda w=w: _http_idle(w), timeout_s=10)  # type: ignore[misc]


def test_sim_worker_without_kv_transfer_has_no_port(redis_url: str, tmp_path: Path) -> None:
    w = start_worker(engine="sim", redis_url=redis_url, namespace=NAMESPACE, log_dir=tmp_path,
                     instance_id="sim-no-kv", env={"SHOAL_KV_TRANSFER": "false"},
                     ready_timeout_s=60)  # fmt: skip
    try:
        assert _get(w, "/migrations/kv")["kv_port"] is None
    finally:
        w.stop()

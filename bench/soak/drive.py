"""The soak's drivers against a running :class:`Cluster`: references, the
streaming load, and the three phases (random migrations, kills, drain cycles
through the autoscaler), then the leak check. Everything they observe goes
into :class:`Records`, which the caller judges (``accounting``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.soak.accounting import (
    CALL_ERROR,
    DrainRecord,
    KillRecord,
    LeakCheck,
    MigrateReply,
    MigrationAttempt,
    Phase,
    Reference,
    StreamResult,
    Usage,
    drain_outcomes,
    leaks_of,
    read_migrate_reply,
    reason_of,
)
from bench.soak.cluster import Cluster, Slot
from bench.soak.plan import Prompt, pick_pair, pick_request
from bench.soak.sse import feed_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriveConfig:
    concurrency: int
    """Streams kept in flight; more than the instances' batches, so requests queue."""
    migrators: int = 2
    modes: tuple[str, ...] = ("kv", "recompute")
    queued_share: float = 0.5
    migrate_gap_s: float = 0.05
    stream_timeout_s: float = 120.0
    """Longest silence of a stream before the client gives up on it (lost)."""
    kill_wait_s: float = 60.0
    kill_interval_s: float = 10.0
    """At least this long between kills: a request waiting in queues should
    not see more instances die than the gateway has attempts (3) before its
    first token."""
    drain_timeout_s: float = 120.0
    full_drain_every: int = 10
    settle_timeout_s: float = 90.0
    reference_check: int = 8
    seed: int = 0


@dataclass
class Records:
    t0: float = field(default_factory=time.monotonic)
    references: dict[int, Reference] = field(default_factory=dict)
    reference_mismatches: list[dict[str, Any]] = field(default_factory=list)
    streams: list[StreamResult] = field(default_factory=list)
    migrations: list[MigrationAttempt] = field(default_factory=list)
    moved: set[str] = field(default_factory=set)
    """Requests the soak has migrated at least once."""
    kills: list[KillRecord] = field(default_factory=list)
    drains: list[DrainRecord] = field(default_factory=list)
    leak_checks: list[LeakCheck] = field(default_factory=list)
    autoscaler_events: list[dict[str, Any]] = field(default_factory=list)
    """The autoscaler's ``error`` and ``migration_failed`` events."""
    crashes: list[str] = field(default_factory=list)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0


class CallFailed(Exception):
    pass


class Http:
    """JSON calls to instances, with short timeouts (control calls, not streams)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def get(self, url: str, timeout_s: float = 10.0) -> Any:
        status, body = await self.call("GET", url, None, timeout_s)
        if status >= 400:
            raise CallFailed(f"GET {url}: {status} {str(body)[:200]}")
        return body

    async def call(self, method: str, url: str, body: Any, timeout_s: float) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.request(method, url, json=body, timeout=timeout) as resp:
                raw = await resp.read()
                try:
                    return resp.status, json.loads(raw) if raw else None
                except ValueError:
                    return resp.status, raw.decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CallFailed(f"{method} {url}: {type(exc).__name__}: {exc}") from exc


@dataclass
class Context:
    cluster: Cluster
    http: Http
    config: DriveConfig
    prompts: Sequence[Prompt]
    records: Records
    model: str
    rng: random.Random

    def live(self) -> list[Slot]:
        return [s for s in self.cluster.slots if s.alive]


# -- references -------------------------------------------------------------------
async def compute_references(ctx: Context) -> None:
    """Each prompt once, straight to an instance, not migratable, no more at a
    time per instance than its batch (nothing waits, nothing moves). The first
    ``reference_check`` prompts run on a second instance too: instances that
    disagree would make every comparison meaningless."""
    slots = ctx.live()
    limits = {s.index: asyncio.Semaphore(ctx.cluster.spec.max_num_seqs) for s in slots}

    async def one(prompt: Prompt, slot: Slot, tag: str) -> Reference:
        async with limits[slot.index]:
            status, body = await ctx.http.call(
                "POST", slot.url + "/generate", prompt.generate_body(f"ref-{tag}-{prompt.index}"),
                ctx.config.stream_timeout_s * 4,
            )  # fmt: skip
        if status != 200:
            raise CallFailed(f"reference {prompt.index} on {slot.instance_id}: {status} {body}")
        return Reference(body["text"], Usage.from_json(body["usage"]), body["finish_reason"])

    tasks = {p.index: one(p, slots[p.index % len(slots)], "a") for p in ctx.prompts}
    results = await asyncio.gather(*tasks.values())
    ctx.records.references = dict(zip(tasks, results, strict=True))
    if len(slots) < 2:
        return
    checked = ctx.prompts[: ctx.config.reference_check]
    again = await asyncio.gather(*(one(p, slots[(p.index + 1) % len(slots)], "b")
                                   for p in checked))  # fmt: skip
    for p, ref in zip(checked, again, strict=True):
        if ref != ctx.records.references[p.index]:
            ctx.records.reference_mismatches.append(
                {"prompt": p.index, "a": _ref_json(ctx.records.references[p.index]),
                 "b": _ref_json(ref)})  # fmt: skip


def _ref_json(r: Reference) -> dict[str, Any]:
    return {"text": r.text, "usage": vars(r.usage), "finish_reason": r.finish_reason}


# -- the load ---------------------------------------------------------------------
async def stream_once(ctx: Context, phase: Phase, prompt: Prompt) -> StreamResult:
    """One streaming call through the gateway, read to its end."""
    result = StreamResult(phase.value, prompt.index, ctx.records.now(), prompt.kind.value)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                    sock_read=ctx.config.stream_timeout_s)  # fmt: skip
    url = ctx.cluster.gateway_url + prompt.path
    try:
        async with ctx.http.session.post(url, json=prompt.openai_body(ctx.model),
                                         timeout=timeout) as resp:  # fmt: skip
            result.http_status = resp.status
            if resp.status != 200:
                result.errors.append(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            else:
                async for raw in resp.content:
                    feed_line(result, raw.decode(errors="replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.transport_error = f"{type(exc).__name__}: {exc}"
    result.ended_s = ctx.records.now()
    ctx.records.streams.append(result)
    return result


async def run_load(ctx: Context, phase: Phase, stop: asyncio.Event) -> None:
    """Keep ``concurrency`` streams in flight until ``stop``; the streams in
    flight then finish (each bounded by the stream timeout)."""

    async def worker(seed: int) -> None:
        rng = random.Random(f"{ctx.config.seed}:{phase}:{seed}")
        while not stop.is_set():
            await stream_once(ctx, phase, rng.choice(ctx.prompts))

    await asyncio.gather(*(worker(i) for i in range(ctx.config.concurrency)))


async def with_load(ctx: Context, phase: Phase, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` with the load running, then let the load finish."""
    ctx.records.phases[phase.value] = {"start_s": ctx.records.now()}
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(ctx, phase, stop))
    try:
        await asyncio.sleep(1.0)  # requests reach the instances
        await body()
    except BaseException:  # Ctrl-C or a fault: do not wait for the streams
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        raise
    else:
        stop.set()
        await load
    finally:
        ctx.records.phases[phase.value]["end_s"] = ctx.records.now()


# -- phase 1: migrations ----------------------------------------------------------
async def migrate_once(ctx: Context, rng: random.Random) -> MigrationAttempt | None:
    """Pick a source, destination, request and mode at random and ask; None
    when there was nothing to move."""
    slots = {s.instance_id: s for s in ctx.live()}
    pair = pick_pair(rng, sorted(slots))
    if pair is None:
        return None
    src, dst = slots[pair[0]], slots[pair[1]]
    picked = pick_request(rng, await ctx.http.get(src.url + "/requests"), ctx.config.queued_share)
    if picked is None:
        return None
    request_id, queued = picked
    waiting = int((await ctx.http.get(dst.url + "/load")).get("num_waiting", 0))
    mode = rng.choice(ctx.config.modes)
    t = ctx.records.now()
    body = {"destination": dst.url, "request_ids": [request_id], "mode": mode}
    try:
        status, reply = await ctx.http.call("POST", src.url + "/migrate", body, 300.0)
        r = read_migrate_reply(status, reply, mode)
    except CallFailed as exc:
        r = MigrateReply(CALL_ERROR, mode, error=str(exc))
    moved = request_id in ctx.records.moved
    if r.outcome == "migrated":
        ctx.records.moved.add(request_id)
    return MigrationAttempt(t, src.instance_id, dst.instance_id, request_id, r.mode, queued,
                            waiting, r.outcome, r.downtime_s, r.error, moved)  # fmt: skip


async def migrations_phase(ctx: Context, target: int, deadline: float) -> None:
    done = asyncio.Event()

    async def mover(i: int) -> None:
        rng = random.Random(f"{ctx.config.seed}:migrator:{i}")
        while not done.is_set() and ctx.records.now() < deadline:
            try:
                attempt = await migrate_once(ctx, rng)
            except CallFailed as exc:  # an instance did not answer a listing
                log.warning("migrator: %s", exc)
                attempt = None
            if attempt is None:
                await asyncio.sleep(0.02)
                continue
            ctx.records.migrations.append(attempt)
            if sum(1 for m in ctx.records.migrations if m.counted) >= target:
                done.set()
            await asyncio.sleep(rng.uniform(0, ctx.config.migrate_gap_s))

    async def body() -> None:
        await asyncio.gather(*(mover(i) for i in range(ctx.config.migrators)))

    await with_load(ctx, Phase.MIGRATIONS, body)


# -- phase 2: kills ---------------------------------------------------------------
async def _requests_on(ctx: Context, slot: Slot) -> list[dict[str, Any]]:
    try:
        listing = await ctx.http.get(slot.url + "/requests")
    except CallFailed:
        return []
    return list(listing)


async def _wait_for(pred: Callable[[], Awaitable[bool]], timeout_s: float,
                    interval_s: float = 0.05) -> bool:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(interval_s)
    return False


async def kill_once(ctx: Context, slot: Slot) -> KillRecord:
    """SIGKILL the slot's instance once it is generating for a stream, then
    bring up its replacement and wait until the gateway lists it and no
    longer lists the dead one: one failure at a time (several dead entries
    at once would have the gateway spend a request's attempts on them, which
    tests the registry's expiry rather than recovery)."""
    listing: list[dict[str, Any]] = []

    async def generating() -> bool:
        nonlocal listing
        listing = await _requests_on(ctx, slot)
        return any(r.get("num_output", 0) > 0 and r.get("migratable") for r in listing)

    await _wait_for(generating, ctx.config.kill_wait_s)
    t, victim = ctx.records.now(), slot.instance_id
    rids = tuple(str(r["request_id"]) for r in listing)
    await asyncio.to_thread(ctx.cluster.kill, slot)
    try:
        restart_s = await ctx.cluster.relaunch(slot)
        await ctx.cluster.wait_gateway_sees(len(ctx.cluster.slots))
    except (RuntimeError, TimeoutError) as exc:
        return KillRecord(t, slot.index, victim, rids, error=f"{type(exc).__name__}: {exc}")
    return KillRecord(t, slot.index, victim, rids, slot.instance_id, restart_s)


async def kills_phase(ctx: Context, target: int, deadline: float) -> None:
    async def body() -> None:
        k = 0
        while len(ctx.records.kills) < target and ctx.records.now() < deadline:
            slot = ctx.cluster.slots[k % len(ctx.cluster.slots)]
            k += 1
            if ctx.records.kills:
                since = ctx.records.now() - ctx.records.kills[-1].t_s
                await asyncio.sleep(max(0.0, ctx.config.kill_interval_s - since))
            record = await kill_once(ctx, slot)
            ctx.records.kills.append(record)
            log.info("kill %d: %s (%d requests), back as %s after %.1fs", len(ctx.records.kills),
                     record.instance_id, len(record.request_ids), record.restarted_as,
                     record.restart_s or 0.0)  # fmt: skip
            if record.error:
                return  # a slot that cannot come back ends the phase

    await with_load(ctx, Phase.KILLS, body)


# -- phase 3: drains through the autoscaler ---------------------------------------------
class EventReader:
    """The autoscaler's event stream (``<ns>:events``), read from a mark on."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(redis_url, decode_responses=True)
        self._key = f"{namespace}:events"

    async def mark(self) -> str:
        try:
            last: Any = await self._redis.xrevrange(self._key, count=1)
        except Exception as exc:  # a slow Valkey must not end the soak
            log.warning("reading the autoscaler's events: %s", exc)
            return "0-0"
        return str(last[0][0]) if last else "0-0"

    async def since(self, mark: str) -> list[dict[str, Any]]:
        try:
            rows: Any = await self._redis.xrange(self._key, min=f"({mark}", max="+")
        except Exception as exc:
            log.warning("reading the autoscaler's events: %s", exc)
            return []
        return [{"kind": str(f["kind"]), "ts": float(f["ts"]), "data": json.loads(f["data"])}
                for _id, f in rows or []]  # fmt: skip

    async def close(self) -> None:
        await self._redis.aclose()


class Anchor:
    """Long requests straight to an instance, not migratable, one after the
    other: while one runs the instance is never empty, so the autoscaler
    drains it (moves every migratable request away) but does not stop it."""

    def __init__(self, ctx: Context, slot: Slot, name: str) -> None:
        self.ctx, self.slot, self.name = ctx, slot, name
        self.request_id = ""
        self._task: asyncio.Task[None] | None = None

    def _body(self, n: int) -> dict[str, Any]:
        self.request_id = f"{self.name}-{n}"
        rng = random.Random(self.request_id)
        return {"request_id": self.request_id, "prompt": [rng.randrange(10, 256) for _ in range(8)],
                "max_tokens": self.ctx.cluster.spec.max_model_len - 16, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "migratable": False}  # fmt: skip

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        for n in range(1000):  # a fresh one whenever the last finishes
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.ctx.http.session.post(self.slot.url + "/generate",
                                                      json=self._body(n),
                                                      timeout=timeout) as resp:  # fmt: skip
                    async for _ in resp.content:
                        pass
            await asyncio.sleep(0)

    async def start(self) -> bool:
        self._task = asyncio.create_task(self._run())

        async def listed() -> bool:
            return any(r["request_id"] == self.request_id
                       for r in await _requests_on(self.ctx, self.slot))  # fmt: skip

        return await _wait_for(listed, 30.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(CallFailed):  # the disconnect aborts it too, within a second
            await self.ctx.http.call("POST", f"{self.slot.url}/abort/{self.request_id}", None, 10)


async def _set_status(ctx: Context, slot: Slot, status: str) -> None:
    code, body = await ctx.http.call("POST", slot.url + "/status", {"status": status}, 10)
    if code != 200:
        raise CallFailed(f"POST /status {status} on {slot.instance_id}: {code} {body}")


async def drain_once(ctx: Context, slot: Slot, full: bool, events: EventReader) -> DrainRecord:
    """One drain cycle of ``slot`` by the autoscaler, with streams in flight.
    Partial: an anchor keeps the instance alive; once the autoscaler has moved
    every migratable request away it is set active again. Full: no anchor;
    the autoscaler moves everything, then stops the instance (SIGTERM by its
    pid, as for an instance it did not launch), and the soak starts a
    replacement."""

    async def migratable() -> list[dict[str, Any]]:
        return [r for r in await _requests_on(ctx, slot) if r.get("migratable")]

    async def has_load() -> bool:
        return len(await migratable()) >= 2

    await _wait_for(has_load, 30.0)
    at_start = len(await migratable())
    victim, t0, wall0 = slot.instance_id, ctx.records.now(), time.time()
    anchor = None if full else Anchor(ctx, slot, f"soak-anchor-{victim}-{len(ctx.records.drains)}")
    error = None
    if anchor is not None and not await anchor.start():
        error = "the anchor request never showed up"
    mark = await events.mark()

    async def drained() -> bool:
        if full:
            return not slot.alive
        return not await migratable()

    completed, restarted, reasons = False, None, Counter[str]()
    try:
        await _set_status(ctx, slot, "draining")
        completed = await _wait_for(drained, ctx.config.drain_timeout_s, 0.1)
        if slot.alive:
            with contextlib.suppress(CallFailed):  # only evidence: not worth failing the cycle
                reasons = await _failure_reasons(ctx, slot, since=wall0)
    except CallFailed as exc:
        error = str(exc)
    try:
        if slot.alive:
            await _set_status(ctx, slot, "active")
        if anchor is not None:
            await anchor.stop()
        if not slot.alive:  # a full drain, or an anchor that ended too soon
            await asyncio.to_thread(ctx.cluster.reap, slot)
            await ctx.cluster.relaunch(slot)
            await ctx.cluster.wait_gateway_sees(len(ctx.cluster.slots))
            restarted = slot.instance_id
    except (CallFailed, RuntimeError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        completed = False
    outcomes = drain_outcomes(await events.since(mark), victim)
    return DrainRecord(t0, slot.index, victim, full or restarted is not None, at_start,
                       dict(outcomes), completed and error is None, ctx.records.now() - t0,
                       restarted, error, dict(reasons))  # fmt: skip


async def _failure_reasons(ctx: Context, slot: Slot, *, since: float) -> Counter[str]:
    """``outcome: reason`` of the slot's migrations since ``since`` (wall
    time) that did not succeed, from its ``GET /migrations`` history."""
    history = (await ctx.http.get(slot.url + "/migrations")).get("history", [])
    return Counter(
        f"{h['outcome']}: {reason_of(h.get('error'))}"
        for h in history
        if h.get("started_at", 0) >= since and h.get("outcome") != "migrated"
    )


async def drains_phase(ctx: Context, target: int, deadline: float) -> None:
    await ctx.cluster.start_autoscaler()
    events = EventReader(ctx.cluster.redis_url, ctx.cluster.spec.namespace)
    start_mark = await events.mark()

    async def body() -> None:
        c = 0
        while (
            sum(d.completed for d in ctx.records.drains) < target and ctx.records.now() < deadline
        ):
            slot = ctx.cluster.slots[c % len(ctx.cluster.slots)]
            c += 1
            every = ctx.config.full_drain_every
            record = await drain_once(ctx, slot, every > 0 and c % every == 0, events)
            ctx.records.drains.append(record)
            log.info("drain %d of %s (%s): %s, autoscaler migrations %s", c, record.instance_id,
                     "full" if record.full else "partial",
                     "ok" if record.completed else f"STUCK {record.error}",
                     record.autoscaler_outcomes)  # fmt: skip

    try:
        await with_load(ctx, Phase.DRAINS, body)
    finally:
        ctx.cluster.stop_autoscaler()
        ctx.records.autoscaler_events.extend(
            e for e in await events.since(start_mark) if e["kind"] in ("error", "migration_failed")
        )
        await events.close()


# -- the end ------------------------------------------------------------------------
async def instance_leaks(ctx: Context, slot: Slot) -> list[str]:
    try:
        migrations = await ctx.http.get(slot.url + "/migrations")
        kv = await ctx.http.get(slot.url + "/migrations/kv")
        requests = await ctx.http.get(slot.url + "/requests")
        load = await ctx.http.get(slot.url + "/load")
    except CallFailed as exc:
        return [f"unreachable: {exc}"]
    return leaks_of(migrations, kv, requests, load)


async def check_leaks(ctx: Context) -> None:
    """Every live instance, polled until it holds nothing or the settle time
    (longer than the 60 s pin expiry) runs out."""

    async def one(slot: Slot) -> LeakCheck:
        started = time.monotonic()
        leaks: list[str] = []

        async def clean() -> bool:
            nonlocal leaks
            leaks = await instance_leaks(ctx, slot)
            return not leaks

        ok = await _wait_for(clean, ctx.config.settle_timeout_s, 0.5)
        return LeakCheck(slot.instance_id, () if ok else tuple(leaks), time.monotonic() - started)

    ctx.records.leak_checks = list(await asyncio.gather(*(one(s) for s in ctx.live())))


def note_crashes(ctx: Context) -> list[Slot]:
    """Instances that died without being killed or stopped by the soak."""
    dead = [s for s in ctx.cluster.slots if not s.alive]
    for s in dead:
        assert s.server is not None
        ctx.records.crashes.append(f"{s.instance_id} exited with {s.server.proc.returncode}:\n"
                                   f"{s.server.log_tail()}")  # fmt: skip
    return dead

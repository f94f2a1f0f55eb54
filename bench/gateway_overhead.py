"""Gateway overhead: latency added per request, requests/s per core, and
memory, for Shoal's gateway next to vLLM's router and LiteLLM's proxy in front
of the same two sim instances, and direct to the instances.

    .venv/bin/python -m bench.gateway_overhead [--requests 3000] [--concurrency 200]

Three loads, each a closed loop of streaming (and of whole) completions of 16
tokens:

- ``saturate``: zero-latency sim instances, so every target runs flat out.
  The figure that matters is the target's CPU time per request (summed over
  its processes), i.e. requests/s per core; raw req/s is capped by the core
  that the load generator shares with the instances.
- ``1 client``: the same instances, one request at a time: the latency a
  target adds when it is idle.
- ``200 streams``: sim instances at the A10 latency model (about 1 s per
  request at this batch size), so 200 streams are open at once at a rate every
  target should sustain; latency added = target minus direct, p50 and p99.

The target under test is pinned to core 0 (with Redis, whose CPU counts as
Shoal's); the instances and this load generator to core 1. The third-party
routers live in their own virtualenv (``bench/out/routers-venv``, created on
first run; see bench/routers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench.common import PLOTS, REPO, Server, bar_plot, free_port
from bench.routers import LITELLM_KEY, start_litellm, start_vllm_router
from infra.embedded_redis import EmbeddedRedis
from infra.procs import shoal_command
from infra.settings import CommonSettings

MODEL = "m"
TARGET_CPUS, LOAD_CPUS = {0}, {1}
LOGS = REPO / "bench" / "out"


@dataclass
class Run:
    target: str
    scenario: str
    stream: bool
    e2e_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    errors: int = 0

    @property
    def rps(self) -> float:
        return len(self.e2e_s) / self.wall_s

    @property
    def cpu_ms_per_req(self) -> float:
        return 1000 * self.cpu_s / max(1, len(self.e2e_s))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Target:
    name: str
    urls: list[str]
    """Base URLs requests go to, in turn (several only for direct)."""
    server: Server | None = None
    shares: list[psutil.Process] = field(default_factory=list)
    """Other processes whose CPU this target's requests use (Shoal: Redis)."""

    def cpu_s(self) -> float:
        if self.server is None:
            return 0.0
        return self.server.cpu_s() + sum(sum(p.cpu_times()[:2]) for p in self.shares)


async def _one(session: aiohttp.ClientSession, url: str, stream: bool, run: Run) -> None:
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 16, "stream": stream,
            "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    first = 0.0
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            run.errors += 1
            await resp.read()
            return
        async for _ in resp.content:
            first = first or time.perf_counter() - t0
    run.ttft_s.append(first)
    run.e2e_s.append(time.perf_counter() - t0)


async def _load(target: Target, run: Run, requests: int, concurrency: int) -> None:
    headers = {
        "Authorization": f"Bearer {LITELLM_KEY}",
        **CommonSettings().cluster_keys().headers(),
    }
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        urls = itertools.cycle(target.urls)
        for _ in range(50):  # warm up connections and code paths
            await _one(session, next(urls), run.stream, Run("", "", run.stream))
        remaining = requests
        cpu0 = target.cpu_s()

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await _one(session, next(urls), run.stream, run)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - start
        run.cpu_s = target.cpu_s() - cpu0


@contextmanager
def _instances(redis_url: str, speedup: float, tag: str) -> Iterator[list[str]]:
    servers = []
    for i in range(2):
        port = free_port()
        cmd = [*shoal_command(), "instance", "--engine", "sim", "--port", str(port),
               "--instance-id", f"sim-{i}", "--served-model-name", MODEL,
               "--sim-speedup", str(speedup), "--max-num-seqs", "1024",
               "--num-sim-blocks", "1000000"]  # fmt: skip
        servers.append(Server(cmd, f"http://127.0.0.1:{port}/ready",
                              {"SHOAL_REDIS_URL": redis_url}, LOGS / f"{tag}-sim-{i}.log",
                              cpus=LOAD_CPUS))  # fmt: skip
    try:
        for s in servers:
            s.wait_ready()
        yield [s.base_url for s in servers]
    finally:
        for s in servers:
            s.stop()


def _start_shoal(redis_url: str, tag: str) -> Server:
    port = free_port()
    cmd = shoal_command("gateway", "--port", str(port))
    return Server(cmd, f"http://127.0.0.1:{port}/readyz", {"SHOAL_REDIS_URL": redis_url},
                  LOGS / f"{tag}-shoal.log", cpus=TARGET_CPUS)  # fmt: skip


Load = tuple[str, int, int]
"""A load on a set of targets: its name, concurrent clients and requests."""


def _scenario(tag: str, speedup: float, loads: list[Load], redis_url: str, redis_pid: int,
              rounds: int, rss: dict[str, float]) -> list[Run]:  # fmt: skip
    runs: list[Run] = []
    with _instances(redis_url, speedup, tag) as urls:
        servers = {
            "shoal": _start_shoal(redis_url, tag),
            "vllm-router": start_vllm_router(urls, TARGET_CPUS, LOGS / f"{tag}-vllm-router.log"),
            "litellm": start_litellm(MODEL, urls, TARGET_CPUS, LOGS / f"{tag}-litellm.log"),
        }
        try:
            targets = [Target("direct", urls)]
            for target_name, server in servers.items():
                server.wait_ready(120)
                shares = [psutil.Process(redis_pid)] if target_name == "shoal" else []
                targets.append(Target(target_name, [server.base_url], server, shares))
            time.sleep(1)
            for (name, concurrency, requests), _, stream, target in itertools.product(
                loads, range(rounds), (True, False), targets
            ):
                run = Run(target.name, name, stream)
                # LiteLLM manages tens of requests/s: fewer keep the run short.
                n = requests // 4 if target.name == "litellm" and concurrency > 1 else requests
                asyncio.run(_load(target, run, n, concurrency))
                print(f"  {name:<12} {target.name:<12} {'stream' if stream else 'whole':<7}"
                      f"{run.rps:7.0f} req/s  p50 {pct(run.e2e_s, .5) * 1000:7.1f} ms"
                      f"  errors {run.errors}", flush=True)  # fmt: skip
                runs.append(run)
            for target in targets:
                if target.server is not None:
                    rss[target.name] = max(rss.get(target.name, 0.0), target.server.rss_mib())
        finally:
            for server in servers.values():
                server.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    LOGS.mkdir(parents=True, exist_ok=True)
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis.start(Path(tmp) / "valkey")
        # Redis is Shoal's: it shares the target's core and its CPU counts as Shoal's.
        os.sched_setaffinity(redis.process.pid, TARGET_CPUS)
        os.sched_setaffinity(0, LOAD_CPUS)
        try:
            pid = redis.process.pid
            fast = [("saturate", args.concurrency, args.requests), ("1 client", 1, 300)]
            paced = [(f"{args.concurrency} streams", args.concurrency, args.requests)]
            runs = _scenario("fast", 1e6, fast, redis.url, pid, args.rounds, rss)
            runs += _scenario("paced", 1.0, paced, redis.url, pid, args.rounds, rss)
        finally:
            redis.stop()
    _report(runs, args, rss)


def _report(runs: list[Run], args: argparse.Namespace, rss: dict[str, float]) -> None:
    targets = ["direct", "shoal", "vllm-router", "litellm"]
    print(f"\n{args.concurrency} concurrent clients, 16-token completions, {args.rounds} rounds; "
          "target on core 0, instances + load generator on core 1\n")  # fmt: skip
    header = (f"{'scenario':<12} {'mode':<7} {'target':<12} {'req/s':>7} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'TTFT p50':>9} {'+p50 ms':>8} {'+p99 ms':>8} {'CPU ms/req':>11} "
              f"{'req/s/core':>11} {'errors':>6}")  # fmt: skip
    print(header)
    per_core: dict[str, float] = {}
    for scenario in dict.fromkeys(r.scenario for r in runs):
        for stream in (True, False):
            base = [r for r in runs if r.scenario == scenario and r.stream == stream
                    and r.target == "direct"]  # fmt: skip
            b50 = pct([x for r in base for x in r.e2e_s], 0.5)
            b99 = pct([x for r in base for x in r.e2e_s], 0.99)
            for target in targets:
                rs = [r for r in runs if r.scenario == scenario and r.stream == stream
                      and r.target == target]  # fmt: skip
                e2e = [x for r in rs for x in r.e2e_s]
                ttft = [x for r in rs for x in r.ttft_s]
                rps = statistics.mean(r.rps for r in rs)
                cpu = statistics.mean(r.cpu_ms_per_req for r in rs)
                p50, p99 = pct(e2e, 0.5), pct(e2e, 0.99)
                cpu_txt = f"{cpu:11.2f}" if target != "direct" else f"{'-':>11}"
                core_txt = f"{1000 / cpu:11.0f}" if target != "direct" else f"{'-':>11}"
                if scenario == "saturate" and target != "direct":
                    per_core[f"{target}\n{'stream' if stream else 'whole'}"] = 1000 / cpu
                added = (f"{(p50 - b50) * 1000:+8.1f} {(p99 - b99) * 1000:+8.1f}"
                         if target != "direct" else f"{'-':>8} {'-':>8}")  # fmt: skip
                print(f"{scenario:<12} {'stream' if stream else 'whole':<7} {target:<12} "
                      f"{rps:7.0f} {p50 * 1000:8.1f} {p99 * 1000:8.1f} {pct(ttft, .5) * 1000:9.1f} "
                      f"{added} {cpu_txt} {core_txt} {sum(r.errors for r in rs):6d}")  # fmt: skip
    print("\nRSS after load (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    bar_plot(PLOTS / "gateway_overhead.png", "Requests/s per core of the target (saturate)",
             list(per_core), list(per_core.values()), "req/s per core")  # fmt: skip
    print(f"plot: {PLOTS / 'gateway_overhead.png'}")


if __name__ == "__main__":
    main()

"""Gateway overhead: latency added per request, requests/s per gateway core,
gateway memory, and start-up time, against a zero-latency sim instance.

    .venv/bin/python -m bench.gateway_overhead [--requests 2000] [--concurrency 200]

Direct = the instance worker's own /generate; gateway = /v1/completions through
one gateway replica (Llumnix dispatch, Redis reservations). Same sim instance,
same load generator, alternating rounds. Everything shares this machine's two
cores, so the load generator competes with what it measures: read the
per-core figure (gateway CPU time per request) rather than raw throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.common import PLOTS, REPO, Server, bar_plot, free_port, python
from infra.embedded_redis import EmbeddedRedis


@dataclass
class Run:
    name: str
    stream: bool
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    gateway_cpu_s: float = 0.0

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Request = Callable[[httpx.AsyncClient, bool], Awaitable[tuple[float, float]]]


async def _direct(client: httpx.AsyncClient, stream: bool) -> tuple[float, float]:
    body = {"prompt": "hello world", "max_tokens": 16, "stream": stream}
    t0 = time.perf_counter()
    first = 0.0
    async with client.stream("POST", "/generate", json=body) as resp:
        async for _ in resp.aiter_lines():
            first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0


async def _gateway(client: httpx.AsyncClient, stream: bool) -> tuple[float, float]:
    body = {"model": "m", "prompt": "hello world", "max_tokens": 16, "stream": stream}
    t0 = time.perf_counter()
    first = 0.0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for _ in resp.aiter_lines():
            first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0


async def _load(base: str, request: Request, run: Run, requests: int, concurrency: int,
                gateway_pid: int | None) -> None:  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        for _ in range(20):
            await request(client, run.stream)
        remaining = requests
        proc = psutil.Process(gateway_pid) if gateway_pid else None
        cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                first, total = await request(client, run.stream)
                run.ttft_s.append(first)
                run.latencies_s.append(total)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - start
        run.gateway_cpu_s = sum(proc.cpu_times()[:2]) - cpu0 if proc else 0.0


def _startup_s(redis_url: str, log: Path, runs: int = 5) -> list[float]:
    times = []
    for _ in range(runs):
        port = free_port()
        t0 = time.perf_counter()
        server = Server([python(), "-m", "infra.cli", "gateway", "--port", str(port),
                         "--redis-url", redis_url], f"http://127.0.0.1:{port}/healthz", {},
                        log)  # fmt: skip
        server.wait_ready(30)
        times.append(time.perf_counter() - t0)
        server.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        logs = REPO / "bench" / "out"
        logs.mkdir(parents=True, exist_ok=True)
        redis = EmbeddedRedis.start(tmp / "valkey")
        env = {"SHOAL_REDIS_URL": redis.url}
        wport, gport = free_port(), free_port()
        worker = Server([python(), "-m", "infra.cli", "instance", "--engine", "sim",
                         "--port", str(wport), "--served-model-name", "m",
                         "--sim-speedup", "1000000", "--max-num-seqs", "1024",
                         "--num-sim-blocks", "1000000"],
                        f"http://127.0.0.1:{wport}/ready", env, logs / "worker.log")  # fmt: skip
        gateway = Server([python(), "-m", "infra.cli", "gateway", "--port", str(gport)],
                         f"http://127.0.0.1:{gport}/readyz", env, logs / "gateway.log")  # fmt: skip
        try:
            worker.wait_ready()
            gateway.wait_ready()
            time.sleep(1)
            for _ in range(args.rounds):
                for stream in (True, False):
                    for name, base, req, pid in (
                        ("direct", f"http://127.0.0.1:{wport}", _direct, None),
                        ("gateway", f"http://127.0.0.1:{gport}", _gateway, gateway.proc.pid),
                    ):
                        run = Run(name, stream)
                        asyncio.run(_load(base, req, run, args.requests, args.concurrency, pid))
                        runs.append(run)
            rss_mb = psutil.Process(gateway.proc.pid).memory_info().rss / 2**20
        finally:
            gateway.stop()
            worker.stop()
        startup = _startup_s(redis.url, logs / "startup.log")
        redis.stop()
    _report(runs, args, rss_mb, startup)


def _report(runs: list[Run], args: argparse.Namespace, rss_mb: float, startup: list[float]) -> None:
    print(f"\n{args.requests} requests x {args.rounds} rounds, {args.concurrency} concurrent, "
          "16 tokens each, zero-latency sim instance\n")  # fmt: skip
    print(f"{'mode':<10} {'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'TTFT p50':>9} {'req/s':>8} "
          f"{'gw CPU ms/req':>14}")  # fmt: skip
    summary: dict[tuple[str, bool], tuple[float, float]] = {}
    for stream in (True, False):
        for name in ("direct", "gateway"):
            rs = [r for r in runs if r.name == name and r.stream == stream]
            lat = [x for r in rs for x in r.latencies_s]
            ttft = [x for r in rs for x in r.ttft_s]
            rps = statistics.mean(len(r.latencies_s) / r.wall_s for r in rs)
            cpu = statistics.mean(1000 * r.gateway_cpu_s / len(r.latencies_s) for r in rs)
            p50, p99 = rs[0].pct(lat, 0.5) * 1000, rs[0].pct(lat, 0.99) * 1000
            summary[(name, stream)] = (p50, p99)
            mode = "stream" if stream else "whole"
            cpu_txt = f"{cpu:14.2f}" if name == "gateway" else f"{'-':>14}"
            print(f"{mode:<10} {name:<8} {p50:8.1f} {p99:8.1f} {rs[0].pct(ttft, 0.5) * 1000:9.1f} "
                  f"{rps:8.0f} {cpu_txt}")  # fmt: skip
    for stream in (True, False):
        d, g = summary[("direct", stream)], summary[("gateway", stream)]
        print(f"added by the gateway ({'stream' if stream else 'whole'}): "
              f"p50 {g[0] - d[0]:+.1f} ms, p99 {g[1] - d[1]:+.1f} ms")  # fmt: skip
    gw_cpu = [1000 * r.gateway_cpu_s / len(r.latencies_s) for r in runs if r.name == "gateway"]
    print(
        f"gateway requests/s per core (1 / CPU per request): {1000 / statistics.mean(gw_cpu):.0f}"
    )
    print(f"gateway RSS after load: {rss_mb:.0f} MiB")
    print(f"gateway start-up to /healthz: median {statistics.median(startup):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in startup)})")  # fmt: skip
    modes = [(n, s) for s in (True, False) for n in ("direct", "gateway")]
    labels = [f"{n}\n{'stream' if s else 'whole'}" for n, s in modes]
    title = "p50 request latency, 200 concurrent (ms)"
    bar_plot(PLOTS / "gateway_overhead.png", title, labels, [summary[m][0] for m in modes], "ms")
    print(f"plot: {PLOTS / 'gateway_overhead.png'}")


if __name__ == "__main__":
    main()

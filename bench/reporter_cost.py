"""CPU cost of load reporting: the reporter building a LoadReport from the
engine's state and publishing it (with the heartbeat) to a real Valkey.

    .venv/bin/python -m bench.reporter_cost [--seconds 10] [--running 64]

The reporter runs alone in this process against a sim engine holding
`--running` running and `--waiting` waiting requests, so the process's CPU
time is the reporter's. CPU share is of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from bench.common import PLOTS, bar_plot
from infra.contract import SamplingSpec
from infra.embedded_redis import EmbeddedRedis
from infra.keys import KeySchema
from infra.records import InstanceInfo, InstanceStatus, Priority
from infra.store import StateStore
from instance.engine import EngineRequest
from instance.reporter import LoadReporter, ReporterConfig
from instance.sim.core import SimConfig
from instance.sim.engine import SimEngine


def _engine(running: int, waiting: int) -> SimEngine:
    engine = SimEngine(SimConfig(num_blocks=8192, block_size=16, max_num_seqs=running),
                       max_model_len=4096)  # fmt: skip
    prios = list(Priority)
    for i in range(running + waiting):
        engine.core.add(EngineRequest(f"r{i}", tuple(range(200)), SamplingSpec(max_tokens=1000),
                                      prios[i % 3], float(i)))  # fmt: skip
    for _ in range(5):
        engine.core.step()
    return engine


async def _measure(
    url: str, interval_s: float, seconds: float, engine: SimEngine
) -> dict[str, float]:
    redis = Redis.from_url(url)
    limits = engine.limits
    info = InstanceInfo(
        instance_id="bench", address="http://127.0.0.1:1", model="m", engine="sim",
        status=InstanceStatus.ACTIVE, pid=0, hostname="h", started_at=0.0,
        block_size=limits.block_size, num_blocks_total=limits.num_blocks_total,
        max_num_seqs=limits.max_num_seqs, max_model_len=limits.max_model_len,
    )  # fmt: skip
    reporter = LoadReporter(engine, StateStore(redis, KeySchema("bench")), lambda: info,
                            ReporterConfig(interval_s=interval_s))  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(reporter.run(stop))
    await asyncio.sleep(0.5)  # warm up connections
    cpu0, wall0, seq0 = time.process_time(), time.perf_counter(), reporter.latest
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert reporter.latest is not None and seq0 is not None
    reports = reporter.latest.seq - seq0.seq
    stop.set()
    await task
    await redis.aclose()
    return {"reports_per_s": reports / wall, "cpu_share": cpu / wall,
            "cpu_ms_per_report": 1000 * cpu / max(reports, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--waiting", type=int, default=32)
    args = parser.parse_args()
    engine = _engine(args.running, args.waiting)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis.start(Path(tmp))
        try:
            for interval in (0.1, 0.05, 0.02):
                m = asyncio.run(_measure(server.url, interval, args.seconds, engine))
                rows.append((interval, m))
        finally:
            server.stop()
    print(f"reporter with {args.running} running + {args.waiting} waiting requests, "
          f"{args.seconds:.0f} s per row, real Valkey on loopback\n")  # fmt: skip
    print(f"{'interval':>9} {'reports/s':>10} {'CPU ms/report':>14} {'CPU share':>10}")
    for interval, m in rows:
        print(f"{interval * 1000:>7.0f}ms {m['reports_per_s']:>10.1f} "
              f"{m['cpu_ms_per_report']:>14.3f} {100 * m['cpu_share']:>9.2f}%")  # fmt: skip
    bar_plot(PLOTS / "reporter_cost.png", "Reporter CPU share of one core",
             [f"{m['reports_per_s']:.0f}/s" for _, m in rows],
             [100 * m["cpu_share"] for _, m in rows], "% of one core")  # fmt: skip
    print(f"plot: {PLOTS / 'reporter_cost.png'}")


if __name__ == "__main__":
    main()

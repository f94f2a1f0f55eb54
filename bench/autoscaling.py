"""Cost versus tail latency with autoscaling (the analogue of Llumnix's
Figure 14), on a live stack: embedded Valkey, a gateway, an autoscaler with
the local provider and sim instances (a modelled start-up time stands in for
loading weights), replaying a trace whose load rises and falls.

Static provisioning runs ``--peak`` instances all along (the autoscaler's
``static`` policy); autoscaling runs the ``band`` policy between 1 and
``--peak`` instances, for several bands. Each run reports instance-seconds
(the cost: GPU-seconds on GPU hosts), TTFT and end-to-end latency, errors,
and, from the autoscaler's events, the cold-start time of each instance it
started and the time from the load rising to the first new instance serving.

    .venv/bin/python -m bench.autoscaling [--arrivals poisson,gamma] [--bands 5:40,10:60,20:120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import PLOTS, REPO, Server, free_port
from bench.loadgen import LoadGenConfig, RunResult, run_trace
from bench.traces import Gamma, Poisson, Trace, TraceConfig, generate_trace, uniform
from infra.embedded_redis import EmbeddedRedis
from infra.events import DrainEvent, Event, EventLog, MigratedEvent, ReadyEvent, ScaleOutEvent
from infra.keys import KeySchema
from infra.procs import shoal_command
from infra.records import AutoscalerState
from infra.status import AutoscalerBoard

LOGS = REPO / "bench" / "out" / "autoscaling"
INSTANCE_ARGS = "--num-sim-blocks 256 --max-num-seqs 16 --max-model-len 2048"
"""A small KV cache so a few instances saturate on this machine."""


def phased_trace(arrivals: str, phases: list[tuple[float, float]], seed: int) -> Trace:
    """Requests at ``rate`` for ``duration_s``, phase after phase."""
    requests, offset = [], 0.0
    for i, (duration_s, rate) in enumerate(phases):
        process = Poisson(rate) if arrivals == "poisson" else Gamma(rate, 3.0)
        n = max(1, round(duration_s * rate))
        config = TraceConfig(n, process, uniform(32, 256), uniform(32, 256), seed=seed + i)
        part = [r for r in generate_trace(config).requests if r.arrival_s < duration_s]
        requests += [replace(r, arrival_s=round(r.arrival_s + offset, 6)) for r in part]
        offset += duration_s
    return Trace(None, tuple(requests))


async def _events(redis_url: str, ns: str) -> tuple[list[Event], AutoscalerState | None]:
    redis = Redis.from_url(redis_url)
    try:
        keys = KeySchema(ns)
        events = await EventLog(redis, keys.events).recent(10_000)
        return events, await AutoscalerBoard(redis, keys).read()
    finally:
        await redis.aclose()


def _instance_seconds(state: AutoscalerState | None) -> float:
    return state.instance_seconds if state is not None else 0.0


def _servers(label: str, env: dict[str, str], scaler_args: list[str],
             startup_s: float) -> tuple[Server, Server]:  # fmt: skip
    """A gateway and an autoscaler of sim instances (not yet ready)."""
    gw_port, as_port = free_port(), free_port()
    gateway = Server(shoal_command("gateway", "--port", str(gw_port)),
                     f"http://127.0.0.1:{gw_port}/readyz", env,
                     LOGS / f"{label}-gateway.log")  # fmt: skip
    cmd = shoal_command("autoscaler", "--engine", "sim", "--port", str(as_port), "--tick-s", "0.5",
                        "--instance-args", f"{INSTANCE_ARGS} --sim-startup-s {startup_s}",
                        *scaler_args)  # fmt: skip
    scaler = Server(cmd, f"http://127.0.0.1:{as_port}/healthz", env,
                    LOGS / f"{label}-autoscaler.log")  # fmt: skip
    return gateway, scaler


def _run(
    label: str, trace: Trace, redis_url: str, scaler_args: list[str], startup_s: float
) -> dict[str, Any]:
    ns = f"bench-as-{uuid.uuid4().hex[:6]}"
    env = {"SHOAL_REDIS_URL": redis_url, "SHOAL_NAMESPACE": ns, "SHOAL_RUN_DIR": str(LOGS)}
    gateway, scaler = _servers(label, env, scaler_args, startup_s)
    try:
        gateway.wait_ready()
        scaler.wait_ready()
        time.sleep(startup_s + 5)  # the initial instances start before the trace does
        _, before = asyncio.run(_events(redis_url, ns))
        t0 = time.time()
        config = LoadGenConfig(endpoint=gateway.base_url, model="sim-model", prompt_mode="text",
                               status_redis=redis_url, namespace=ns, progress=False)  # fmt: skip
        run = asyncio.run(run_trace(trace, config))
        events, state = asyncio.run(_events(redis_url, ns))
    finally:
        scaler.stop()
        gateway.stop()
    return _row(label, run, events, state, t0, _instance_seconds(before))


def _row(
    label: str,
    run: RunResult,
    events: list[Event],
    state: AutoscalerState | None,
    t0: float,
    seconds_before: float,
) -> dict[str, Any]:
    summary = run.summary()
    during = [e for e in events if e.timestamp >= t0]
    ready = [(e.timestamp, e.payload) for e in during if isinstance(e.payload, ReadyEvent)]
    cold = [p.cold_start_s for _, p in ready]
    return {
        "label": label,
        "instance_seconds": _instance_seconds(state) - seconds_before,
        "duration_s": run.duration_s,
        "mean_instances": (summary.get("instances") or {}).get("mean"),
        "ttft_p99_s": (summary.get("ttft_s") or {}).get("p99"),
        "ttft_mean_s": (summary.get("ttft_s") or {}).get("mean"),
        "e2e_p99_s": (summary.get("e2e_s") or {}).get("p99"),
        "errors": sum(summary.get("errors", {}).values()),
        "requests": len(run.requests),
        "scale_outs": sum(1 for e in during if isinstance(e.payload, ScaleOutEvent)),
        "drains": sum(1 for e in during if isinstance(e.payload, DrainEvent)),
        "migrations": sum(1 for e in during if isinstance(e.payload, MigratedEvent)),
        "cold_start_s": statistics.median(cold) if cold else None,
        "ready_times_s": [round(t - t0, 1) for t, _ in ready],
    }


def main() -> None:
    args = _parse_args()
    phases = [(float(d), float(r)) for d, r in (p.split(":") for p in args.phases.split(","))]
    LOGS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis.start(Path(tmp) / "valkey")
        try:
            for arrivals in args.arrivals.split(","):
                trace = phased_trace(arrivals, phases, args.seed)
                for label, scaler_args in _runs(arrivals, str(args.peak), args.bands.split(",")):
                    run = _run(label, trace, redis.url, scaler_args, args.startup_s)
                    row = {"arrivals": arrivals, **run}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            redis.stop()
    (LOGS / "results.json").write_text(json.dumps(rows, indent=2))
    _report(rows, phases)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arrivals", default="poisson,gamma")
    parser.add_argument("--bands", default="5:40,10:60,20:120")
    parser.add_argument("--peak", type=int, default=4)
    parser.add_argument(
        "--phases", default="40:2,80:12,40:2", help="duration_s:rate per phase (rate in requests/s)"
    )
    parser.add_argument(
        "--startup-s", type=float, default=10.0, help="modelled instance start-up (weights loading)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _runs(arrivals: str, peak: str, bands: list[str]) -> list[tuple[str, list[str]]]:
    """(label, autoscaler arguments): static at the peak, then each band."""
    static = ["--scaling-policy", "static", "--min-instances", peak, "--max-instances", peak]
    runs = [(f"{arrivals}-static", static)]
    for band in bands:
        low, high = band.split(":")
        band_args = ["--min-instances", "1", "--max-instances", peak, "--freeness-low", low,
                     "--freeness-high", high, "--cooldown-s", "5"]  # fmt: skip
        runs.append((f"{arrivals}-band-{low}-{high}", band_args))
    return runs


def _report(rows: list[dict[str, Any]], phases: list[tuple[float, float]]) -> None:
    print(
        f"\n{'run':<24} {'inst-s':>7} {'vs static':>9} {'mean inst':>9} {'TTFT p99':>9} "
        f"{'TTFT mean':>9} {'e2e p99':>8} {'errors':>6} {'outs':>4} {'cold start':>10}"
    )
    for row in rows:
        static = next(
            r for r in rows if r["arrivals"] == row["arrivals"] and r["label"].endswith("static")
        )
        saving = 1 - row["instance_seconds"] / static["instance_seconds"]
        cold = f"{row['cold_start_s']:.1f} s" if row["cold_start_s"] else "-"
        print(
            f"{row['label']:<24} {row['instance_seconds']:>7.0f} {saving:>+9.0%} "
            f"{row['mean_instances'] or 0:>9.2f} {row['ttft_p99_s']:>8.2f}s "
            f"{row['ttft_mean_s']:>8.2f}s {row['e2e_p99_s']:>7.1f}s {row['errors']:>6} "
            f"{row['scale_outs']:>4} {cold:>10}"
        )
    rise = phases[0][0]
    for row in rows:
        late = [t - rise for t in row["ready_times_s"] if t >= rise]
        if late:
            print(f"{row['label']}: first new instance serving {late[0]:.1f} s after the load rose")
    _plot(rows)


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arrivals, marker in (("poisson", "o"), ("gamma", "s")):
        rs = [r for r in rows if r["arrivals"] == arrivals]
        if not rs:
            continue
        ax.scatter(
            [r["instance_seconds"] for r in rs],
            [r["ttft_p99_s"] for r in rs],
            marker=marker,
            label=arrivals,
        )
        for r in rs:
            ax.annotate(
                r["label"].removeprefix(arrivals + "-"),
                (r["instance_seconds"], r["ttft_p99_s"]),
                fontsize=7,
            )
    ax.set_xlabel("instance-seconds (cost)")
    ax.set_ylabel("P99 TTFT (s)")
    ax.set_title("Autoscaling: cost vs tail latency (sim instances, live stack)")
    ax.legend()
    fig.tight_layout()
    path = PLOTS / "autoscaling_cost.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

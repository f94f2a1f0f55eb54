"""Validate the cluster simulator against real vLLM: calibrate its latency
model on the vLLM CPU engine with Shoal's tiny model, then run one Poisson
trace on two real instances behind the real gateway (``bench.loadgen``) and
in the simulator (two instances, the calibrated model, the real KV capacity,
block size, batch limits and token budget), and compare mean and P99 TTFT and
end-to-end latency.

Calibration (both instances at once, so the two cores are as contended as in
the run; requests straight to the instances' OpenAI endpoints):

* prefill: lone requests (one at a time per instance) with prompts of 16 to
  1024 tokens and 4 output tokens; TTFT = a + prefill_per_token_s x prompt;
* decode: bursts of b = 1, 2, 4, 8 simultaneous requests with 32- and
  768-token prompts generating 128 tokens, twice each; their TPOT =
  step_base_s + decode_per_seq_s x b + decode_per_context_token_s x b x the
  mean context (prompt + 64) by least squares;
* the lone requests through the gateway, against the same straight to one
  instance, give the gateway's hop (reported, not used).

The bursts leave out what a full-stack run adds on this host: arrivals at
random times, the gateway, Valkey and the load generator streaming every token
on the same two cores. So a third trace with a seed of its own (``FIT_RATE``,
the 'fit' run) is measured through the gateway, and two constants are fitted
on it: the factor by which the engines step slower than in the bursts (the
simulated mean TPOT matches the measured one) and the per-request time outside
the engine model (measured minus simulated mean TTFT), added to the
simulator's TTFT and e2e. The validation traces are other traces (seed 0).

Two trace rates are chosen from the fitted model (``LOADS``): the highest
candidate rates at which the simulator predicts a mean TTFT at most 1.25 and
2 times a lone request's (moderate; loaded, queueing visible). The moderate
trace is measured twice, to show how far two measurements of one trace are
apart on this host.

Each instance (its HTTP worker, engine core and model worker) is pinned to a
core of its own, as an engine owns its accelerator; the gateway, Valkey and
the load generator float over both cores.

Before starting vLLM it waits until no other vLLM engine runs on the machine
(polling every 30 s, up to 20 minutes); it starts exactly two, one core each.

    .venv/bin/python -m bench.validate_sim [--num-requests 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from autoscaler.policies import ScalingConfig
from bench.common import REPO, Server, free_port
from bench.loadgen import LoadGenConfig, RequestResult, run_trace
from bench.simulator import simulate
from bench.simulator.config import SimulationConfig
from bench.simulator.hardware import HardwarePreset
from bench.traces import Poisson, Trace, TraceConfig, TraceRequest, generate_trace, uniform
from infra.embedded_redis import EmbeddedRedis
from infra.procs import shoal_command
from infra.settings import CommonSettings
from instance.sim.latency import LatencyModel

OUT = REPO / "bench" / "out" / "validate_sim"
NAMESPACE = "validate-sim"
MODEL_NAME = "tiny-llama"
BLOCK_SIZE = 32
MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 2048
KV_CACHE_BYTES = 16 * 1024 * 1024
"""2 layers x 2 (K, V) x 128 x 4 B = 2 KiB a token: 256 blocks of 32 tokens,
so a busy instance can run short of KV (about ten requests of the trace)."""
PREFILL_LENGTHS = (16, 128, 256, 512, 1024)
DECODE_BATCHES = (1, 2, 4, 8)
DECODE_PROMPTS = (32, 768)
"""Prompt lengths of the decode bursts: a step's cost can grow with the context
its sequences attend to, not only with their number (a direct test of bursts
of 4-8 here gave 0.6-0.9 us per context token; the fit varies run to run)."""
DECODE_OUTPUT = 128
BURST_GAP_S = 5.0
CANDIDATE_RATES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
VLLM_PATTERN = "EngineCore|vllm.entrypoints|--engine vllm"


# -- the real stack ----------------------------------------------------------------------
def wait_for_no_vllm(timeout_s: float = 1200.0, poll_s: float = 30.0) -> None:
    """Block until no vLLM engine runs on the machine (another benchmark's)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = subprocess.run(["pgrep", "-f", VLLM_PATTERN], capture_output=True, text=True)
        if not found.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM engines still running: {found.stdout.split()}")
        print(f"waiting for other vLLM engines to end: {found.stdout.split()}", flush=True)
        time.sleep(poll_s)


def _instance(name: str, core: int, model: Path, redis_url: str, logs: Path) -> Server:
    port = free_port()
    cmd = [*shoal_command(), "instance", "--engine", "vllm", "--port", str(port),
           "--instance-id", name, "--model", str(model), "--served-model-name", MODEL_NAME,
           "--cpu-threads-bind", str(core), "--block-size", str(BLOCK_SIZE),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-bytes", str(KV_CACHE_BYTES)]  # fmt: skip
    env = {"SHOAL_REDIS_URL": redis_url, "SHOAL_DTYPE": "float32", "SHOAL_NAMESPACE": NAMESPACE,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    # The whole instance (HTTP worker, engine core, model worker) on its core,
    # as an engine owns its accelerator: unpinned, the scheduler stacked more
    # of one instance's processes on one core and its steps ran up to 1.7x
    # slower than the other's in the same burst.
    return Server(cmd, f"http://127.0.0.1:{port}/ready", env, logs / f"{name}.log", cpus={core})


def _gateway(redis_url: str, logs: Path) -> Server:
    port = free_port()
    cmd = shoal_command("gateway", "--port", str(port))
    env = {"SHOAL_REDIS_URL": redis_url, "SHOAL_NAMESPACE": NAMESPACE}
    return Server(cmd, f"http://127.0.0.1:{port}/readyz", env, logs / "gateway.log")


def _budget(log: Path) -> int:
    """vLLM's step token budget, from its start-up log (chunked prefill)."""
    found = re.search(r"max_num_batched_tokens=(\d+)", log.read_text(errors="replace"))
    return int(found.group(1)) if found else 2048


# -- calibration -------------------------------------------------------------------------
def _spaced(lengths: Sequence[tuple[int, int]], gap_s: float) -> Trace:
    reqs = [TraceRequest(i * gap_s, p, o) for i, (p, o) in enumerate(lengths)]
    return Trace(None, tuple(reqs))


def prefill_trace(repeats: int = 3) -> Trace:
    """Lone requests, one a second, prompts of every calibration length."""
    return _spaced([(p, 4) for _ in range(repeats) for p in PREFILL_LENGTHS], 1.0)


@dataclass(frozen=True)
class Burst:
    """``batch`` simultaneous requests with ``prompt_tokens``-token prompts
    generating ``DECODE_OUTPUT`` tokens each."""

    batch: int
    prompt_tokens: int

    @property
    def mean_context_tokens(self) -> float:
        """Tokens a sequence attends to, averaged over its decode steps."""
        return self.prompt_tokens + DECODE_OUTPUT / 2


BURSTS = tuple(Burst(b, p) for p in DECODE_PROMPTS for b in DECODE_BATCHES)


def decode_trace(gap_s: float = BURST_GAP_S, repeats: int = 2) -> Trace:
    """Every burst of ``BURSTS``, ``repeats`` times, ``gap_s`` apart."""
    plan = [burst for _ in range(repeats) for burst in BURSTS]
    reqs = [TraceRequest(k * gap_s, burst.prompt_tokens, DECODE_OUTPUT)
            for k, burst in enumerate(plan) for _ in range(burst.batch)]  # fmt: skip
    return Trace(None, tuple(reqs))


def burst_of(scheduled_s: float, gap_s: float = BURST_GAP_S) -> Burst:
    """The burst of ``decode_trace`` a request scheduled at ``scheduled_s`` is in."""
    return BURSTS[round(scheduled_s / gap_s) % len(BURSTS)]


def fit_decode(samples: Sequence[tuple[Burst, float]]) -> tuple[float, float, float]:
    """Least squares TPOT = base + per_seq x batch + per_context x batch x context
    over (burst, TPOT) samples: (base, per_seq, per_context_token)."""
    import numpy as np

    rows = [(1.0, b.batch, b.batch * b.mean_context_tokens) for b, _ in samples]
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array([t for _, t in samples]), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


@dataclass(frozen=True)
class Calibration:
    latency: LatencyModel
    ttft_intercept_s: float
    """TTFT of a lone request with an empty prompt, straight to an instance."""
    instance_overhead_s: float
    """ttft_intercept_s - step_base_s: per request, not modelled."""
    gateway_overhead_s: float
    """What the gateway adds to a lone request's TTFT (lone requests through
    it against the same straight to one instance, one at a time)."""
    samples: dict[str, list[tuple[float, ...]]]


async def _both(trace: Trace, endpoints: Sequence[str]) -> list[RequestResult]:
    configs = [LoadGenConfig(endpoint=e, model=MODEL_NAME, progress=False, seed=i)
               for i, e in enumerate(endpoints)]  # fmt: skip
    runs = await asyncio.gather(*(run_trace(trace, c) for c in configs))
    results = [r for run in runs for r in run.requests]
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"calibration requests failed: {bad[:3]}")
    return results


def calibrate(instances: Sequence[str], gateway: str) -> Calibration:
    """Fit the step-latency model on the live instances (see the module doc)."""
    asyncio.run(_both(_spaced([(64, 4)] * 3, 0.5), instances))  # warm-up
    lone = asyncio.run(_both(prefill_trace(), instances))
    ttft: list[tuple[float, ...]] = [(float(r.prompt_tokens), r.ttft_s or 0.0) for r in lone]
    a, prefill = fit_line([x for x, _ in ttft], [y for _, y in ttft])
    burst = asyncio.run(_both(decode_trace(), instances))
    gaps = [(burst_of(r.scheduled_s), r.tpot_s or 0.0) for r in burst]
    base, per_seq, per_context = fit_decode(gaps)
    alone = asyncio.run(_both(prefill_trace(2), instances[:1]))
    via = asyncio.run(_both(prefill_trace(2), [gateway]))
    hop = statistics.fmean(r.ttft_s or 0.0 for r in via) - statistics.fmean(
        r.ttft_s or 0.0 for r in alone
    )
    model = LatencyModel(
        step_base_s=max(base, 0.0),
        prefill_per_token_s=max(prefill, 0.0),
        decode_per_seq_s=max(per_seq, 0.0),
        decode_per_context_token_s=max(per_context, 0.0),
    )
    tpot: list[tuple[float, ...]] = [(float(b.batch), b.mean_context_tokens, t) for b, t in gaps]
    return Calibration(model, a, a - model.step_base_s, hop, {"ttft": ttft, "tpot": tpot})


# -- the trace, both ways ----------------------------------------------------------------
def make_trace(num_requests: int, rate: float, seed: int) -> Trace:
    """Poisson arrivals, prompts of 32-512 tokens, outputs of 16-256."""
    config = TraceConfig(num_requests, Poisson(rate), uniform(32, 512), uniform(16, 256),
                         seed=seed)  # fmt: skip
    return generate_trace(config)


def hardware(cal: Calibration, num_blocks: int, budget: int, slowdown: float = 1.0
             ) -> HardwarePreset:  # fmt: skip
    """The calibrated instance, its steps ``slowdown`` times slower."""
    return HardwarePreset(
        name="tiny-llama-vllm-cpu", description="Shoal's tiny model on one core, calibrated",
        latency=cal.latency.scaled(1 / slowdown), num_blocks=num_blocks, block_size=BLOCK_SIZE,
        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=budget,
    )  # fmt: skip


def sim_config(hw: HardwarePreset, seed: int) -> SimulationConfig:
    """Two static instances, the gateway's default (Llumnix) dispatch over load
    reports published every 50 ms (the worker's period), no autoscaler so no
    migration."""
    return SimulationConfig(num_instances=2, scaling_config=ScalingConfig(2, 2), migration=False,
                            report_interval_s=0.05, hardware=hw, seed=seed)  # fmt: skip


def choose_rate(hw: HardwarePreset, num_requests: int, seed: int, factor: float) -> float:
    """The highest candidate rate whose predicted mean TTFT is at most
    ``factor`` times a lone request's (predicted)."""
    lone = simulate([TraceRequest(0.0, 272, 4)], sim_config(hw, seed)).summary["ttft_s"]["mean"]
    chosen = CANDIDATE_RATES[0]
    for rate in CANDIDATE_RATES:
        trace = make_trace(num_requests, rate, seed).requests
        if simulate(trace, sim_config(hw, seed)).summary["ttft_s"]["mean"] > factor * lone:
            break
        chosen = rate
    return chosen


def live_run(trace: Trace, gateway: str, redis_url: str) -> dict[str, Any]:
    config = LoadGenConfig(endpoint=gateway, model=MODEL_NAME, progress=False,
                           status_redis=redis_url, namespace=NAMESPACE)  # fmt: skip
    run = asyncio.run(run_trace(trace, config))
    return run.summary()


FIT_RATE = 3.0
"""Rate of the fitting trace (a seed of its own): moderate load on two instances."""


def fit_slowdown(cal: Calibration, num_blocks: int, budget: int, trace: Trace,
                 measured_tpot_s: float, seed: int) -> float:  # fmt: skip
    """How much slower the engines step in a full-stack run than in the
    calibration bursts: the factor at which the simulated mean TPOT of
    ``trace`` equals the measured one (bisection in log space over [0.5, 4];
    the simulated TPOT grows with the factor)."""
    lo, hi = 0.5, 4.0
    for _ in range(16):
        mid = math.sqrt(lo * hi)
        hw = hardware(cal, num_blocks, budget, mid)
        tpot = simulate(trace.requests, sim_config(hw, seed)).summary["tpot_s"]["mean"]
        lo, hi = (mid, hi) if tpot < measured_tpot_s else (lo, mid)
    return math.sqrt(lo * hi)


def fit_overhead(hw: HardwarePreset, trace: Trace, measured_ttft_s: float, seed: int) -> float:
    """The per-request time outside the engine model (HTTP hops, tokenising,
    detokenising, waiting for a shared core): measured mean TTFT of ``trace``
    minus the simulated one, at least 0."""
    sim = simulate(trace.requests, sim_config(hw, seed)).summary["ttft_s"]["mean"]
    return max(measured_ttft_s - float(sim), 0.0)


LOADS = {"moderate": 1.25, "loaded": 2.0}
"""Trace rates: the highest candidate whose predicted mean TTFT is at most
this many times a lone request's."""


@dataclass
class LiveRun:
    load: str
    rate: float
    trace: Trace
    live: dict[str, Any]


@dataclass
class Measured:
    calibration: Calibration
    num_blocks: int
    budget: int
    fit: LiveRun
    """The trace the slowdown and overhead were fitted on (not a validation run)."""
    slowdown: float
    overhead_s: float
    runs: list[LiveRun]
    """The validation runs; the moderate trace twice (how much two measurements
    of one trace differ)."""


def measure(num_requests: int, seed: int, work: Path) -> Measured:
    """Start the stack, calibrate, run the trace; stop everything."""
    subprocess.run(shoal_command("model", "tiny", str(work / "tiny")), cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis.start(work / "valkey")
    servers: list[Server] = []
    try:
        servers = [_instance(f"vs-{i}", i, work / "tiny", redis.url, OUT) for i in (0, 1)]
        for s in servers:
            s.wait_ready(600)
        gateway = _gateway(redis.url, OUT)
        servers.append(gateway)
        gateway.wait_ready()
        time.sleep(2)  # the gateway sees both instances' reports
        load = httpx.get(
            servers[0].base_url + "/load",
            timeout=10,
            headers=CommonSettings().cluster_keys().headers(),
        ).json()
        budget = _budget(servers[0].log)
        print(f"instances ready: {load['num_blocks_total']} blocks, budget {budget}", flush=True)
        cal = calibrate([s.base_url for s in servers[:2]], gateway.base_url)
        print(f"calibrated: {cal.latency}", flush=True)
        blocks = int(load["num_blocks_total"])
        fit_trace = make_trace(num_requests, FIT_RATE, seed + 1)
        fit = LiveRun("fit", FIT_RATE, fit_trace,
                      live_run(fit_trace, gateway.base_url, redis.url))  # fmt: skip
        slowdown = fit_slowdown(cal, blocks, budget, fit_trace, fit.live["tpot_s"]["mean"], seed)
        print(f"engines {slowdown:.2f}x slower in a full-stack run than in the bursts", flush=True)
        hw = hardware(cal, blocks, budget, slowdown)
        overhead = fit_overhead(hw, fit_trace, fit.live["ttft_s"]["mean"], seed)
        runs = []
        plan = [*LOADS.items(), ("moderate, again", LOADS["moderate"])]
        for name, factor in plan:
            rate = choose_rate(hw, num_requests, seed, factor)
            trace = make_trace(num_requests, rate, seed)
            print(f"{name}: {num_requests} requests at {rate:g} req/s via the gateway", flush=True)
            runs.append(LiveRun(name, rate, trace, live_run(trace, gateway.base_url, redis.url)))
    finally:
        for s in reversed(servers):
            s.stop()
        redis.stop()
    return Measured(cal, blocks, budget, fit, slowdown, overhead, runs)


# -- the comparison ----------------------------------------------------------------------
def _shift(summary: dict[str, Any], extra_s: float) -> dict[str, dict[str, float]]:
    """TTFT and e2e stats of a summary with a constant per-request overhead added."""
    return {m: {k: v + extra_s for k, v in summary[m].items()} for m in ("ttft_s", "e2e_s")}


def _row(name: str, real: float, pure: float, plus: float) -> str:
    def cell(x: float) -> str:
        return f"{1000 * x:.1f} ms ({100 * (x / real - 1):+.0f} %)"

    return f"| {name} | {1000 * real:.1f} ms | {cell(pure)} | {cell(plus)} |"


def compare(m: Measured, seed: int) -> tuple[str, dict[str, Any]]:
    """Predicted against measured, per run: the table and the JSON."""
    hw = hardware(m.calibration, m.num_blocks, m.budget, m.slowdown)
    overhead = m.overhead_s
    rows, runs = [], []
    for run in [m.fit, *m.runs]:
        sim = simulate(run.trace.requests, sim_config(hw, seed)).summary
        shifted = _shift(sim, overhead)
        for metric, name in (("ttft_s", "TTFT"), ("e2e_s", "e2e"), ("tpot_s", "TPOT")):
            for stat in ("mean", "p99"):
                plus = shifted[metric][stat] if metric in shifted else sim[metric][stat]
                rows.append(_row(f"{run.load} {run.rate:g} req/s | {name} {stat}",
                                 run.live[metric][stat], sim[metric][stat], plus))  # fmt: skip
        runs.append({"load": run.load, "rate": run.rate, "live": run.live, "sim": sim})
    header = ("| run | metric | measured (2 vLLM + gateway) | simulated | simulated + "
              f"{1000 * overhead:.0f} ms overhead |\n|---|---|---|---|---|")  # fmt: skip
    payload = {"calibration": asdict(m.calibration), "num_blocks": m.num_blocks,
               "budget": m.budget, "slowdown": m.slowdown, "overhead_s": overhead,
               "runs": runs}  # fmt: skip
    return header + "\n" + "\n".join(rows), payload


def repeat_spread(m: Measured) -> str:
    """The same trace measured twice: how far apart two measurements are."""
    first, again = (r for r in m.runs if r.load.startswith("moderate"))
    rows = ["| metric | first run | second run | difference |", "|---|---|---|---|"]
    for metric, name in (("ttft_s", "TTFT"), ("e2e_s", "e2e"), ("tpot_s", "TPOT")):
        for stat in ("mean", "p99"):
            a, b = first.live[metric][stat], again.live[metric][stat]
            rows.append(f"| {name} {stat} | {1000 * a:.1f} ms | {1000 * b:.1f} ms | "
                        f"{100 * (b / a - 1):+.0f} % |")  # fmt: skip
    return "\n".join(rows)


def render_calibration(m: Measured) -> str:
    c, lat = m.calibration, m.calibration.latency
    return "\n".join([
        f"step_base_s = {1000 * lat.step_base_s:.2f} ms, prefill_per_token_s = "
        f"{1e6 * lat.prefill_per_token_s:.2f} us, decode_per_seq_s = "
        f"{1000 * lat.decode_per_seq_s:.3f} ms, decode_per_context_token_s = "
        f"{1e6 * lat.decode_per_context_token_s:.3f} us",
        f"lone-request TTFT intercept {1000 * c.ttft_intercept_s:.1f} ms (instance overhead "
        f"{1000 * c.instance_overhead_s:.1f} ms), gateway hop {1000 * c.gateway_overhead_s:.1f} ms",
        f"KV {m.num_blocks} blocks of {BLOCK_SIZE}, max_num_seqs {MAX_NUM_SEQS}, step budget "
        f"{m.budget} tokens; traces of {len(m.runs[0].trace.requests)} requests (Poisson) at "
        + ", ".join(f"{r.rate:g} req/s ({r.load})" for r in [m.fit, *m.runs]),
        f"fitted on the 'fit' trace (seed + 1): engine slowdown in a full-stack run against "
        f"the bursts {m.slowdown:.2f}x, per-request overhead {1000 * m.overhead_s:.1f} ms",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.validate_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    wait_for_no_vllm()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(args.num_requests, args.seed, Path(tmp))
    table, payload = compare(measured, args.seed)
    print("\n" + render_calibration(measured) + "\n\n" + table)
    print("\nThe moderate trace measured twice:\n\n" + repeat_spread(measured))
    print(f"\n({time.monotonic() - t0:.0f} s)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "validate_sim.json").write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {OUT / 'validate_sim.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

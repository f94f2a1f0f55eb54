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
* decode: bursts of b = 1, 2, 4, 8 simultaneous requests (32-token prompts,
  128 output tokens); their TPOT = step_base_s + decode_per_seq_s x b.
  ``decode_per_context_token_s`` is left at 0 (the tiny model's attention is
  negligible next to the engine's per-step overhead);
* the TTFT intercept a minus ``step_base_s`` is the per-request overhead the
  simulator does not model (HTTP, tokenisation, scheduling); the same lone
  requests through the gateway add the gateway's hop. The report shows the
  simulator's prediction as is and with that measured constant added to TTFT
  and e2e.

Two trace rates are chosen from the calibrated model (``LOADS``): the highest
candidate rates at which the simulator predicts a mean TTFT at most 1.25 and
2 times a lone request's (moderate; loaded, queueing visible).

Known limits on this 2-core host (see the report in bench/out/validate_sim/):
the gateway, Valkey and the load generator share the cores with the two
engines, so under load the gateway's Redis reservations time out (1 s socket
timeout, logged as "reservation skipped") and decode steps are slower than in
the calibration; neither is in the simulator.

Before starting vLLM it waits until no other vLLM engine runs on the machine
(polling every 30 s, up to 20 minutes); it starts exactly two, one core each.

    .venv/bin/python -m bench.validate_sim [--num-requests 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from bench.common import REPO, Server, free_port, python
from bench.loadgen import LoadGenConfig, RequestResult, run_trace
from bench.simulator import simulate
from bench.simulator.config import SimulationConfig
from bench.simulator.hardware import HardwarePreset
from bench.traces import Poisson, Trace, TraceConfig, TraceRequest, generate_trace, uniform
from infra.embedded_redis import EmbeddedRedis
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
BURST_GAP_S = 6.0
CANDIDATE_RATES = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
VLLM_PATTERN = "EngineCore|vllm.entrypoints|--engine vllm"
ENGINE_NICE = 10
"""Nice value of the engines' engine-core processes. On this CPU-only host the
two busy engine cores would otherwise take both cores from the control plane
(gateway, workers' HTTP and detokenising side, Valkey, the load generator),
whose queueing the simulator does not model; on a GPU host the engine's
compute is off the CPU. Niced, the control plane runs as soon as it wakes and
the engines absorb its (small, measured) CPU share, calibration included."""


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
    cmd = [python(), "-m", "infra.cli", "instance", "--engine", "vllm", "--port", str(port),
           "--instance-id", name, "--model", str(model), "--served-model-name", MODEL_NAME,
           "--cpu-threads-bind", str(core), "--block-size", str(BLOCK_SIZE),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-bytes", str(KV_CACHE_BYTES)]  # fmt: skip
    env = {"SHOAL_REDIS_URL": redis_url, "SHOAL_DTYPE": "float32", "SHOAL_NAMESPACE": NAMESPACE,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    return Server(cmd, f"http://127.0.0.1:{port}/ready", env, logs / f"{name}.log")


def _gateway(redis_url: str, logs: Path) -> Server:
    port = free_port()
    cmd = [python(), "-m", "infra.cli", "gateway", "--port", str(port)]
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


def decode_trace(gap_s: float = BURST_GAP_S) -> Trace:
    """Bursts of b simultaneous 32-token prompts generating 128 tokens each."""
    reqs = [TraceRequest(k * gap_s, 32, 128) for k, b in enumerate(DECODE_BATCHES)
            for _ in range(b)]  # fmt: skip
    return Trace(None, tuple(reqs))


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
    samples: dict[str, list[tuple[float, float]]]


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
    ttft = [(float(r.prompt_tokens), r.ttft_s or 0.0) for r in lone]
    a, prefill = fit_line([x for x, _ in ttft], [y for _, y in ttft])
    burst = asyncio.run(_both(decode_trace(), instances))
    batch = {k: b for k, b in enumerate(DECODE_BATCHES)}
    gaps = [(float(batch[round(r.scheduled_s / BURST_GAP_S)]), r.tpot_s or 0.0) for r in burst]
    base, per_seq = fit_line([x for x, _ in gaps], [y for _, y in gaps])
    alone = asyncio.run(_both(prefill_trace(2), instances[:1]))
    via = asyncio.run(_both(prefill_trace(2), [gateway]))
    hop = statistics.fmean(r.ttft_s or 0.0 for r in via) - statistics.fmean(
        r.ttft_s or 0.0 for r in alone
    )
    model = LatencyModel(
        step_base_s=max(base, 0.0),
        prefill_per_token_s=max(prefill, 0.0),
        decode_per_seq_s=max(per_seq, 0.0),
        decode_per_context_token_s=0.0,
    )
    return Calibration(model, a, a - model.step_base_s, hop, {"ttft": ttft, "tpot": gaps})


# -- the trace, both ways ----------------------------------------------------------------
def make_trace(num_requests: int, rate: float, seed: int) -> Trace:
    """Poisson arrivals, prompts of 32-512 tokens, outputs of 16-256."""
    config = TraceConfig(num_requests, Poisson(rate), uniform(32, 512), uniform(16, 256),
                         seed=seed)  # fmt: skip
    return generate_trace(config)


def hardware(cal: Calibration, num_blocks: int, budget: int) -> HardwarePreset:
    return HardwarePreset(
        name="tiny-llama-vllm-cpu", description="Shoal's tiny model on one core, calibrated",
        latency=cal.latency, num_blocks=num_blocks, block_size=BLOCK_SIZE,
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
    runs: list[LiveRun]


def measure(num_requests: int, seed: int, work: Path, engine_nice: int) -> Measured:
    """Start the stack, calibrate, run the trace; stop everything."""
    subprocess.run([python(), "-m", "infra.cli", "model", "tiny", str(work / "tiny")], cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis.start(work / "valkey")
    servers: list[Server] = []
    try:
        servers = [_instance(f"vs-{i}", i, work / "tiny", redis.url, OUT) for i in (0, 1)]
        for s in servers:
            s.wait_ready(600)
        for s in servers:
            s.renice_children(engine_nice)
        gateway = _gateway(redis.url, OUT)
        servers.append(gateway)
        gateway.wait_ready()
        time.sleep(2)  # the gateway sees both instances' reports
        load = httpx.get(servers[0].base_url + "/load", timeout=10).json()
        budget = _budget(servers[0].log)
        print(f"instances ready: {load['num_blocks_total']} blocks, budget {budget}", flush=True)
        cal = calibrate([s.base_url for s in servers[:2]], gateway.base_url)
        print(f"calibrated: {cal.latency}", flush=True)
        hw = hardware(cal, int(load["num_blocks_total"]), budget)
        runs = []
        for name, factor in LOADS.items():
            rate = choose_rate(hw, num_requests, seed, factor)
            trace = make_trace(num_requests, rate, seed)
            print(f"{name}: {num_requests} requests at {rate:g} req/s via the gateway", flush=True)
            runs.append(LiveRun(name, rate, trace, live_run(trace, gateway.base_url, redis.url)))
    finally:
        for s in reversed(servers):
            s.stop()
        redis.stop()
    return Measured(cal, int(load["num_blocks_total"]), budget, runs)


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
    hw = hardware(m.calibration, m.num_blocks, m.budget)
    overhead = m.calibration.instance_overhead_s + max(m.calibration.gateway_overhead_s, 0.0)
    rows, runs = [], []
    for run in m.runs:
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
               "budget": m.budget, "overhead_s": overhead, "runs": runs}  # fmt: skip
    return header + "\n" + "\n".join(rows), payload


def render_calibration(m: Measured) -> str:
    c, lat = m.calibration, m.calibration.latency
    return "\n".join([
        f"step_base_s = {1000 * lat.step_base_s:.2f} ms, prefill_per_token_s = "
        f"{1e6 * lat.prefill_per_token_s:.2f} us, decode_per_seq_s = "
        f"{1000 * lat.decode_per_seq_s:.3f} ms, decode_per_context_token_s = 0",
        f"lone-request TTFT intercept {1000 * c.ttft_intercept_s:.1f} ms (instance overhead "
        f"{1000 * c.instance_overhead_s:.1f} ms), gateway hop {1000 * c.gateway_overhead_s:.1f} ms",
        f"KV {m.num_blocks} blocks of {BLOCK_SIZE}, max_num_seqs {MAX_NUM_SEQS}, step budget "
        f"{m.budget} tokens; traces of {len(m.runs[0].trace.requests)} requests (Poisson) at "
        + ", ".join(f"{r.rate:g} req/s ({r.load})" for r in m.runs),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.validate_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine-nice", type=int, default=ENGINE_NICE,
                        help="nice value of the engine-core processes (0: as started)")  # fmt: skip
    args = parser.parse_args(argv)
    wait_for_no_vllm()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(args.num_requests, args.seed, Path(tmp), args.engine_nice)
    table, payload = compare(measured, args.seed)
    print("\n" + render_calibration(measured) + "\n\n" + table)
    print(f"\n({time.monotonic() - t0:.0f} s)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "validate_sim.json").write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {OUT / 'validate_sim.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

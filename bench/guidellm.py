"""guidellm (a standard LLM benchmark client), unmodified, against Shoal's gateway.

    .venv/bin/python -m bench.guidellm [--engine vllm|sim] [--instances 2] [--requests 60]
        [--rate 2] [--profile constant|synchronous] [--prompt-tokens 64] [--output-tokens 32]
        [--endpoint http://127.0.0.1:PORT]

guidellm 0.8.1 lives in its own virtualenv (``bench/out/guidellm-venv``,
created on first run with Shoal's torch pin; it is not a Shoal dependency).
Without ``--endpoint`` this starts a whole stack on loopback, each part a
child in its own process group (an embedded Valkey, ``--instances`` instance
workers of ``--engine``: vLLM with the generated tiny model, each engine
pinned to a core as ``shoal up`` does, or sim, and one gateway), and stops it
afterwards. ``guidellm run`` (itself a child in its own process group, two
worker processes, offline) uses its OpenAI HTTP backend against the gateway:
chat completions, streamed, backend health check on (it first sends ``GET
/health``), synthetic prompts of ``--prompt-tokens`` tokens of the tiny
model's local tokenizer asking for exactly ``--output-tokens`` (``ignore_eos``),
at a constant rate (or one at a time) until ``--requests`` requests are done.
Its JSON report and the table printed from it are saved as
``bench/out/guidellm-<engine>.json`` and ``.txt``; the exit status is 1 if any
request errored or did not complete (the table then lists the errors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.common import REPO, Server, free_port, tool_venv
from infra.embedded_redis import EmbeddedRedis
from infra.procs import kill_group, shoal_command, spawn
from infra.settings import CommonSettings
from instance.tiny_model import TINY_MODEL_NAME, default_tiny_model

VENV = REPO / "bench" / "out" / "guidellm-venv"
# guidellm needs torch (unpinned, so pip takes the newest CUDA build, ~6 GB);
# Shoal's own pin takes the CPU wheel where there is one, as in .venv.
PACKAGES = ["guidellm==0.8.1", "torch==2.13.0"]
OUT = REPO / "bench" / "out"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
GUIDELLM_ENV = {
    **OFFLINE,
    "NO_PROXY": "127.0.0.1,localhost",  # loopback never goes through a proxy
    "no_proxy": "127.0.0.1,localhost",
    "GUIDELLM__MAX_WORKER_PROCESSES": "2",  # one per core, not 10 beside the engines
}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def ensure_venv() -> Path:
    """guidellm's executable, in its virtualenv created on first use."""
    return tool_venv(VENV, PACKAGES, ["guidellm"]) / "guidellm"


# -- the stack -----------------------------------------------------------------------------
@contextlib.contextmanager
def stack(engine: str, instances: int, logs: Path) -> Iterator[str]:
    """Valkey, ``instances`` workers of ``engine`` and a gateway serving
    ``tiny-llama``; yields the gateway's base URL and stops them all."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="shoal-guidellm-") as tmp:
        redis = EmbeddedRedis.start(Path(tmp) / "valkey")
        env = {"SHOAL_REDIS_URL": redis.url, **OFFLINE}
        servers: list[Server] = []
        try:
            for i in range(instances):
                port = free_port()
                cmd = [*shoal_command(), "instance", "--engine", engine, "--port", str(port),
                       "--instance-id", f"{engine}-{i}"]  # fmt: skip
                if engine == "vllm":  # the generated tiny model is the default
                    cmd += ["--cpu-threads-bind", str(i % cores)]
                else:
                    cmd += ["--served-model-name", TINY_MODEL_NAME]
                servers.append(Server(cmd, f"http://127.0.0.1:{port}/ready", env,
                                      logs / f"guidellm-{engine}-{i}.log"))  # fmt: skip
            for s in servers:
                s.wait_ready(600)
            port = free_port()
            gateway = Server(shoal_command("gateway", "--port", str(port)),
                             f"http://127.0.0.1:{port}/readyz", env,
                             logs / f"guidellm-{engine}-gateway.log")  # fmt: skip
            servers.append(gateway)
            gateway.wait_ready()
            _wait_for_model(gateway.base_url, TINY_MODEL_NAME)
            yield gateway.base_url
        finally:
            for s in reversed(servers):
                s.stop()
            redis.stop()


def _wait_for_model(base_url: str, model: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            resp = httpx.get(f"{base_url}/v1/models", timeout=5, trust_env=False)
            data = resp.json()["data"]
            if any(m["id"] == model for m in data):
                return
        time.sleep(0.5)
    raise TimeoutError(f"the gateway at {base_url} does not list {model!r}")


# -- guidellm --------------------------------------------------------------------------------
def guidellm_command(args: argparse.Namespace, target: str, tokenizer: Path,
                     report: Path) -> list[str]:  # fmt: skip
    profile = ("kind=synchronous" if args.profile == "synchronous"
               else f"kind=constant,rate={args.rate}")  # fmt: skip
    return [
        str(ensure_venv()), "run",
        "--backend", f"kind=openai_http,target={target},model={TINY_MODEL_NAME},"
                     f"validate_backend=true,timeout={args.request_timeout}",
        "--profile", profile,
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--constraint", f"kind=max_duration,seconds={args.max_seconds}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                  f"output_tokens={args.output_tokens}",
        "--seed", "kind=static,value=0",
        "--output", f"kind=json,path={report}",
        "--disable-progress",
    ]  # fmt: skip


def run_guidellm(cmd: list[str], log: Path, timeout_s: float) -> int:
    """Run guidellm as a child in its own process group, its output in
    ``log`` (printed afterwards); killed with its workers after ``timeout_s``."""
    env = {**os.environ, **GUIDELLM_ENV, "GUIDELLM__DEFAULT_RESULTS_DIR": str(log.parent)}
    with log.open("wb") as out:
        proc = spawn(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=OUT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        print(f"guidellm still running after {timeout_s:.0f}s; killing it", file=sys.stderr)
    finally:
        kill_group(proc)
        proc.wait()
    print(log.read_text(errors="replace"), flush=True)
    return proc.returncode


# -- the report ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """guidellm's figures for its one benchmark: latencies over the completed
    requests, rates over all of them, as its console tables take them."""

    completed: int
    errored: int
    incomplete: int
    duration_s: float
    requests_per_s: float
    ttft_ms: tuple[float, float]
    """Median and p99."""
    itl_ms: tuple[float, float]
    latency_s: tuple[float, float]
    output_tokens_per_s: float
    errors: dict[str, int]
    """Distinct error messages of the failed requests, with their counts."""

    @property
    def failed(self) -> bool:
        return self.errored > 0 or self.incomplete > 0 or self.completed == 0


def summarize(report: dict[str, Any]) -> Summary:
    (bench,) = report["benchmarks"]
    m = bench["metrics"]

    def mid_p99(name: str) -> tuple[float, float]:
        dist = m[name]["successful"]
        return float(dist["median"]), float(dist["percentiles"]["p99"])

    failed = bench["requests"]["errored"] + bench["requests"]["incomplete"]
    errors = Counter(" ".join(str(r["info"].get("error")).split()) for r in failed)
    totals = m["request_totals"]
    return Summary(
        completed=totals["successful"],
        errored=totals["errored"],
        incomplete=totals["incomplete"],
        duration_s=float(bench["duration"]),
        requests_per_s=float(m["requests_per_second"]["total"]["mean"]),
        ttft_ms=mid_p99("time_to_first_token_ms"),
        itl_ms=mid_p99("inter_token_latency_ms"),
        latency_s=mid_p99("request_latency"),
        output_tokens_per_s=float(m["output_tokens_per_second"]["total"]["mean"]),
        errors=dict(errors),
    )


def table(s: Summary, title: str) -> str:
    rows = [
        ("requests completed / errored / incomplete",
         f"{s.completed} / {s.errored} / {s.incomplete}"),
        ("duration", f"{s.duration_s:.1f} s"),
        ("request rate", f"{s.requests_per_s:.2f} req/s"),
        ("output tokens/s", f"{s.output_tokens_per_s:.1f}"),
        ("TTFT median / p99", f"{s.ttft_ms[0]:.1f} / {s.ttft_ms[1]:.1f} ms"),
        ("ITL median / p99", f"{s.itl_ms[0]:.1f} / {s.itl_ms[1]:.1f} ms"),
        ("request latency median / p99", f"{s.latency_s[0]:.2f} / {s.latency_s[1]:.2f} s"),
    ]  # fmt: skip
    rows += [(f"error x{n}", msg) for msg, n in s.errors.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"{k:<{width}}  {v}" for k, v in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoint", help="a gateway already running on loopback, e.g. "
                        "http://127.0.0.1:8000 (default: start a stack)")  # fmt: skip
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s (constant profile)")
    parser.add_argument("--profile", choices=["constant", "synchronous"], default="constant")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=180.0,
                        help="guidellm's own duration limit")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.endpoint and urlsplit(args.endpoint).hostname not in LOOPBACK:
        parser.error("--endpoint must be on loopback (127.0.0.1)")
    # SIGTERM unwinds like Ctrl-C, so the stack is stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_venv()
    tokenizer = default_tiny_model(CommonSettings().cache_dir)
    tag = "endpoint" if args.endpoint else args.engine
    report = OUT / f"guidellm-{tag}.json"
    report.unlink(missing_ok=True)
    with contextlib.ExitStack() as stop:
        target = args.endpoint or stop.enter_context(stack(args.engine, args.instances, OUT))
        cmd = guidellm_command(args, target.rstrip("/"), tokenizer, report)
        print("$ " + " ".join(cmd), flush=True)
        code = run_guidellm(cmd, OUT / f"guidellm-{tag}.log", args.max_seconds + 120)
    if not report.exists():
        print(f"guidellm exited with {code} and wrote no report", file=sys.stderr)
        return 1
    summary = summarize(json.loads(report.read_text()))
    load = (f"{args.requests} streamed chat completions, {args.prompt_tokens} prompt + "
            f"{args.output_tokens} output tokens, " + ("one at a time" if args.profile ==
            "synchronous" else f"constant {args.rate:g} req/s"))  # fmt: skip
    where = args.endpoint or f"gateway over {args.instances} {args.engine} instance(s)"
    text = table(summary, f"guidellm 0.8.1, {load}; {where}")
    print(text)
    (OUT / f"guidellm-{tag}.txt").write_text(text + "\n")
    return 1 if summary.failed or code != 0 else 0


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())

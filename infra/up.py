"""``shoal up``: the whole stack on this machine, stopped cleanly by Ctrl-C.

Starts (or reuses) the embedded Redis-compatible server, N instance workers,
one gateway and the autoscaler (keeping N instances, balancing them by live
migration), each as a child process with its own log under
``<run_dir>/logs``, waits until all are ready, prints how to use them, and on
Ctrl-C / SIGTERM (or when a child dies) stops every process it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from infra.embedded_redis import resolve_redis
from infra.settings import CommonSettings

BANNER = """
Shoal is up: gateway http://127.0.0.1:{port}  ({n} {engine} instance(s) of {model})

  curl http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -H 'X-Request-Priority: high' \\
    -d '{{"model": "{model}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="unused")
  client.chat.completions.create(model="{model}", max_tokens=16,
                                 messages=[{{"role": "user", "content": "Hi"}}])

  .venv/bin/shoal status        # instances and their load (from another terminal)
  logs: {logs}
Press Ctrl-C to stop everything.
"""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    ready_url: str


def _spawn(name: str, args: list[str], env: dict[str, str], logs: Path, ready_url: str) -> Child:
    log = (logs / f"{name}.log").open("wb")
    # Own process group (killed as one; the terminal's Ctrl-C reaches only us),
    # but the same session: with the kernel's autogroup scheduling a session
    # is a fairness unit, and a vLLM engine busy-polling in a session of its
    # own starves the other processes on its cores for seconds.
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", *args], env={**os.environ, **env},
        stdout=log, stderr=subprocess.STDOUT, process_group=0,
    )  # fmt: skip
    log.close()
    return Child(name, proc, ready_url)


def _stop(children: list[Child]) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for c in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGKILL)


def _wait_ready(children: list[Child], timeout_s: float) -> None:
    pending = list(children)
    deadline = time.monotonic() + timeout_s
    while pending:
        for c in list(pending):
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited with {c.proc.returncode}; see its log")
            try:
                if httpx.get(c.ready_url, timeout=1).status_code == 200:
                    pending.remove(c)
                    print(f"  {c.name} ready", flush=True)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f}s: {[c.name for c in pending]}")
        time.sleep(0.5)


def run_up(*, instances: int, engine: str, model: str | None, port: int, base_port: int) -> int:
    settings = CommonSettings()
    url, redis = resolve_redis(settings.redis_url, settings.run_dir)
    assert url is not None
    logs = (settings.run_dir / "logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    env = {"SHOAL_REDIS_URL": url, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    children: list[Child] = []
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cores = os.cpu_count() or 1
        for i in range(instances):
            p = base_port + i
            args = [
                "instance",
                "--engine",
                engine,
                "--port",
                str(p),
                "--instance-id",
                f"{engine}-{i}",
            ]
            if model:
                args += ["--model", model]
            if engine == "vllm":
                args += ["--cpu-threads-bind", str(i % cores)]
            children.append(_spawn(f"instance-{i}", args, env, logs, f"http://127.0.0.1:{p}/ready"))
        gw = ["gateway", "--port", str(port)]
        children.append(_spawn("gateway", gw, env, logs, f"http://127.0.0.1:{port}/readyz"))
        print(f"starting {instances} {engine} instance(s) and the gateway (Redis {url}) ...")
        _wait_ready(children, timeout_s=600)
        # The autoscaler keeps them at N (replacing one that dies) and balances
        # load by live migration; started last so it adopts the ready instances.
        scaler = ["autoscaler", "--engine", engine, "--min-instances", str(instances),
                  "--max-instances", str(instances), "--port", str(port + 200)]  # fmt: skip
        if model:
            scaler += ["--model", model]
        children.append(_spawn("autoscaler", scaler, env, logs,
                               f"http://127.0.0.1:{port + 200}/healthz"))  # fmt: skip
        _wait_ready(children[-1:], timeout_s=60)
        served = model or ("tiny-llama" if engine == "vllm" else "sim-model")
        print(
            BANNER.format(port=port, n=instances, engine=engine, model=served, logs=logs),
            flush=True,
        )
        while not stopping:
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                print(f"{dead[0].name} exited with {dead[0].proc.returncode}; stopping", flush=True)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        print("stopping ...", flush=True)
        _stop(children)
        if redis is not None:
            redis.stop()
        print("stopped", flush=True)

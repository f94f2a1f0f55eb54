"""``shoal up``: the whole stack on this machine, stopped cleanly by Ctrl-C.

Checks that the ports it needs are free (the gateway's, one per instance from
the base port, the autoscaler's at gateway + 200) and names a taken one
before starting anything. Then starts (or reuses) the embedded
Redis-compatible server, N instance workers, one gateway and the autoscaler
(keeping N instances, balancing them by live migration), each as a child
process with its own log under ``<run_dir>/logs``, waits until all are
ready, and prints how to use them.

It stops every process it started

- on Ctrl-C / SIGTERM at any point, start-up included: SIGTERM to each
  child, SIGKILL to its process group once it has exited or after
  ``GRACE_S`` (``STARTUP_GRACE_S`` during start-up; at once on a second
  Ctrl-C). Exit status 0 once up, 128 + the signal's number during start-up;
- when a child dies (exit status 1; during start-up with the end of its log);
- when ``shoal up`` itself is killed outright, with no cleanup here: every
  child has a parent-death signal (``infra.procs``) and stops itself, the
  autoscaler taking its own instances with it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from infra.embedded_redis import EmbeddedRedis, resolve_redis
from infra.procs import Child, ChildExited, shoal_command, start_child, stop_all, wait_ready
from infra.settings import CommonSettings, GatewaySettings
from infra.tls import TlsConfigError

GRACE_S = 10.0
"""SIGTERM to SIGKILL when stopping a stack that is up: a vLLM worker stops
its engine within a few seconds."""

STARTUP_GRACE_S = 3.0
"""The same during start-up, where nothing serves yet: a worker still loading
its engine acts on SIGTERM only once loaded (uvicorn's lifespan), so only the
SIGKILL of its process group (engine processes included) stops it sooner."""

AUTOSCALER_PORT_OFFSET = 200

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


# -- ports -------------------------------------------------------------------
@dataclass(frozen=True)
class _Port:
    number: int
    owner: str
    change: str
    """How to pick another: the ``make`` variable and the ``shoal up`` flag."""


def _needed_ports(port: int, base_port: int, instances: int) -> list[_Port]:
    gateway = "`make up PORT=<port>` or `shoal up --port <port>`"
    bases = "`make up BASE_PORT=<port>` or `shoal up --base-port <port>`"
    return [
        _Port(port, "the gateway's", gateway),
        *(_Port(base_port + i, f"instance {i}'s", bases) for i in range(instances)),
        _Port(port + AUTOSCALER_PORT_OFFSET, "the autoscaler's (gateway + 200)", gateway),
    ]


def _in_use(host: str, port: int) -> bool:
    # SO_REUSEADDR as uvicorn binds: a port left in TIME_WAIT by a stopped
    # stack is free for it, one with a listener is not.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _taken_port_message(host: str, ports: list[_Port]) -> str | None:
    for p in ports:
        if _in_use(host, p.number):
            return (f"shoal up: port {p.number} ({p.owner}) is already in use (another "
                    f"`shoal up`? stop it or pick another: {p.change})")  # fmt: skip
    return None


# -- signals -----------------------------------------------------------------
class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM recorded, not raised: an exception raised at any
    bytecode could leave a child started but unrecorded (inside Popen) or a
    stop half done. The wake-up pipe ends a ``sleep`` as soon as one comes."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            signal.set_wakeup_fd(old_fd)
            os.close(self._read)
            os.close(self._write)

    def sleep(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``; a signal ends it at once."""
        readable, _, _ = select.select([self._read], [], [], timeout_s)
        if readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 512):
                    pass

    def check(self) -> None:
        """Raise ``_Interrupted`` if a signal has come."""
        if self.received:
            raise _Interrupted(self.received[0])


def _announce(child: Child) -> None:
    print(f"  {child.name} ready", flush=True)


@dataclass
class _Stack:
    signals: _Signals
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], ready_url: str) -> Child:
        self.signals.check()
        child = start_child(name, shoal_command(*args), ready_url=ready_url,
                            log=self.logs / f"{name}.log", env=self.env)  # fmt: skip
        self.children.append(child)
        return child

    def wait_ready(self, children: list[Child], timeout_s: float) -> None:
        wait_ready(children, timeout_s, sleep=self.signals.sleep, check=self.signals.check,
                   on_ready=_announce, poll_s=0.5)  # fmt: skip

    def watch(self) -> int:
        """Once up: 0 when told to stop, 1 when a child dies."""
        while not self.signals.received:
            dead = [c for c in self.children if c.proc.poll() is not None]
            if dead:
                print(f"{dead[0].name} exited with {dead[0].proc.returncode}; stopping",
                      flush=True)  # fmt: skip
                return 1
            self.signals.sleep(0.5)
        return 0

    def stop(self, grace_s: float) -> None:
        seen = len(self.signals.received)

        def hurry(timeout_s: float) -> bool:
            self.signals.sleep(timeout_s)
            return len(self.signals.received) > seen

        stop_all([c.proc for c in self.children], grace_s, sleep=hurry)


def _start(stack: _Stack, *, instances: int, engine: str, model: str | None, port: int,
           base_port: int) -> None:  # fmt: skip
    cores = os.cpu_count() or 1
    scheme = CommonSettings().cluster_tls().scheme  # instances with a certificate serve TLS
    started = []
    for i in range(instances):
        p = base_port + i
        args = ["instance", "--engine", engine, "--port", str(p), "--instance-id", f"{engine}-{i}"]
        if model:
            args += ["--model", model]
        if engine == "vllm":
            args += ["--cpu-threads-bind", str(i % cores)]
        started.append(stack.spawn(f"instance-{i}", args, f"{scheme}://127.0.0.1:{p}/ready"))
    gw = ["gateway", "--port", str(port)]
    started.append(stack.spawn("gateway", gw, f"http://127.0.0.1:{port}/readyz"))
    print(f"starting {instances} {engine} instance(s) and the gateway "
          f"(Redis {stack.env['SHOAL_REDIS_URL']}) ...", flush=True)  # fmt: skip
    stack.wait_ready(started, timeout_s=600)
    # The autoscaler keeps them at N (replacing one that dies) and balances
    # load by live migration; started last so it adopts the ready instances.
    scaler_port = port + AUTOSCALER_PORT_OFFSET
    scaler = ["autoscaler", "--engine", engine, "--min-instances", str(instances),
              "--max-instances", str(instances), "--port", str(scaler_port)]  # fmt: skip
    if model:
        scaler += ["--model", model]
    child = stack.spawn("autoscaler", scaler, f"http://127.0.0.1:{scaler_port}/healthz")
    stack.wait_ready([child], timeout_s=60)


def run_up(*, instances: int, engine: str, model: str | None, port: int, base_port: int) -> int:
    taken = _taken_port_message(GatewaySettings().host, _needed_ports(port, base_port, instances))
    if taken is not None:
        print(taken, file=sys.stderr)
        return 1
    settings = CommonSettings()
    try:
        settings.cluster_tls()
    except TlsConfigError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 2
    logs = (settings.run_dir / "logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    with _Signals().installed() as signals:
        stack = _Stack(signals, logs)
        redis: EmbeddedRedis | None = None
        grace_s = STARTUP_GRACE_S
        try:
            url, redis = resolve_redis(settings.redis_url, settings.run_dir)
            assert url is not None
            stack.env = {"SHOAL_REDIS_URL": url,
                         "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}  # fmt: skip
            _start(stack, instances=instances, engine=engine, model=model, port=port,
                   base_port=base_port)  # fmt: skip
            served = model or ("tiny-llama" if engine == "vllm" else "sim-model")
            print(BANNER.format(port=port, n=instances, engine=engine, model=served, logs=logs),
                  flush=True)  # fmt: skip
            grace_s = GRACE_S
            return stack.watch()
        except _Interrupted as exc:
            print(f"{exc} during start-up", flush=True)
            return 128 + exc.signum
        except (ChildExited, TimeoutError) as exc:
            print(exc, file=sys.stderr, flush=True)
            return 1
        finally:
            print("stopping ... (Ctrl-C again to kill at once)", flush=True)
            stack.stop(grace_s)
            if redis is not None:
                redis.stop()
            print("stopped", flush=True)

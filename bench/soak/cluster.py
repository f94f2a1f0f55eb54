"""The processes a soak runs on loopback: an embedded Valkey, N instance
workers (killed and restarted by slot), a gateway and, for the drain phase,
an autoscaler. Each is started by ``infra.procs.spawn``: its own process
group, this process's session (a session of its own would put a busy vLLM
engine in a scheduler autogroup of its own, starving the rest), and a
parent-death signal, so they stop even if the soak is SIGKILLed;
:meth:`Cluster.close` stops all of them whatever happened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.common import REPO, free_port
from infra.embedded_redis import EmbeddedRedis
from infra.procs import kill_group, shoal_command, spawn, stop_all
from infra.settings import CommonSettings

log = logging.getLogger(__name__)


@dataclass
class Child:
    """A server process with its log and the URL that answers 200 once ready."""

    proc: subprocess.Popen[bytes]
    ready_url: str
    log: Path

    @classmethod
    def start(cls, args: list[str], ready_url: str, env: dict[str, str], log: Path) -> Child:
        """``shoal <args>``, from the main thread (``spawn`` requires it)."""
        with log.open("wb") as out:
            proc = spawn(shoal_command(*args), env={**os.environ, **env}, stdout=out,
                         stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
        return cls(proc, ready_url, log)

    @property
    def base_url(self) -> str:
        return "/".join(self.ready_url.split("/")[:3])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(
            timeout=2, headers=CommonSettings().cluster_keys().headers()
        ) as client:
            while time.monotonic() < deadline:
                if not self.alive:
                    last = (self.log_tail(1) or "(empty log)").strip()
                    raise RuntimeError(f"{self.log.stem} exited with {self.proc.returncode}: "
                                       f"{last[:300]} (log: {self.log})")  # fmt: skip
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.ready_url)).status_code == 200:
                        return
                await asyncio.sleep(0.3)
        raise TimeoutError(f"{self.log.stem} not ready after {timeout_s:.0f}s")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class ClusterSpec:
    engine: str
    """``vllm`` or ``sim``."""
    instances: int
    max_num_seqs: int
    max_model_len: int
    namespace: str
    out_dir: Path
    sim_speedup: float = 1.0
    block_size: int | None = None
    kv_cache_bytes: int | None = None
    ready_timeout_s: float = 600.0
    autoscaler_tick_s: float = 0.5

    @property
    def served_model(self) -> str:
        return "tiny-llama" if self.engine == "vllm" else "sim-model"

    @property
    def logs(self) -> Path:
        return self.out_dir / "logs"


@dataclass
class Slot:
    """One place an instance runs; a kill or a full drain restarts it under a
    new id and port, as a replacement instance would come up."""

    index: int
    core: int
    generation: int = 0
    server: Child | None = None
    instance_id: str = ""

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.alive


@dataclass
class Cluster:
    spec: ClusterSpec
    redis: EmbeddedRedis | None = None
    slots: list[Slot] = field(default_factory=list)
    gateway: Child | None = None
    autoscaler: Child | None = None
    model_path: Path | None = None

    # -- start -------------------------------------------------------------
    async def start(self) -> None:
        spec = self.spec
        spec.logs.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis.start(spec.out_dir / "valkey")
        if spec.engine == "vllm":
            self.model_path = await asyncio.to_thread(self._tiny_model)
        cores = os.cpu_count() or 1
        self.slots = [Slot(i, i % cores) for i in range(spec.instances)]
        for slot in self.slots:
            self._launch(slot)
        port = free_port()
        self.gateway = Child.start(["gateway", "--port", str(port), "--redis-url", self.redis_url],
                                   f"http://127.0.0.1:{port}/readyz", self._env(),
                                   spec.logs / "gateway.log")  # fmt: skip
        await asyncio.gather(*(self._ready(s) for s in [*(sl.server for sl in self.slots),
                                                         self.gateway]))  # fmt: skip
        await self.wait_gateway_sees(len(self.slots))

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None
        return self.gateway.base_url

    def _env(self) -> dict[str, str]:
        return {"SHOAL_NAMESPACE": self.spec.namespace, "SHOAL_REDIS_URL": self.redis_url,
                "SHOAL_RUN_DIR": str(self.spec.out_dir / "run"), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip

    def _tiny_model(self) -> Path:
        """The project's generated tiny model, built once before the instances
        start (several building it at once would race)."""
        from infra.settings import CommonSettings

        path = CommonSettings().cache_dir / "models" / "tiny-llama"
        subprocess.run(shoal_command("model", "tiny", str(path)), cwd=REPO, check=True,
                       capture_output=True, env={**os.environ, **self._env()})  # fmt: skip
        return path

    def _instance_cmd(self, slot: Slot, port: int) -> list[str]:
        s = self.spec
        cmd = ["instance", "--engine", s.engine, "--port", str(port),
               "--instance-id", slot.instance_id, "--served-model-name", s.served_model,
               "--max-num-seqs", str(s.max_num_seqs), "--max-model-len", str(s.max_model_len),
               "--redis-url", self.redis_url]  # fmt: skip
        if s.block_size:
            cmd += ["--block-size", str(s.block_size)]
        if s.engine == "vllm":
            # One engine per core: --cpu-threads-bind sets VLLM_CPU_OMP_THREADS_BIND.
            assert self.model_path is not None
            cmd += ["--model", str(self.model_path), "--cpu-threads-bind", str(slot.core)]
            if s.kv_cache_bytes:
                cmd += ["--kv-cache-bytes", str(s.kv_cache_bytes)]
        else:
            cmd += ["--sim-speedup", str(s.sim_speedup)]
        return cmd

    def _launch(self, slot: Slot) -> None:
        """Start the slot's next incarnation (KV transfer on, on a free KV port:
        the instance defaults)."""
        slot.instance_id = f"soak-{slot.index}-{slot.generation}"
        slot.generation += 1
        port = free_port()
        env = {**self._env(), "SHOAL_DTYPE": "float32"}
        slot.server = Child.start(self._instance_cmd(slot, port), f"http://127.0.0.1:{port}/ready",
                                  env, self.spec.logs / f"{slot.instance_id}.log")  # fmt: skip

    async def _ready(self, server: Child | None) -> None:
        assert server is not None
        await server.wait_ready(self.spec.ready_timeout_s)

    async def wait_gateway_sees(self, n: int, timeout_s: float = 60.0) -> None:
        """Until the gateway's view lists exactly ``n`` instances (its
        ``/readyz``): the new ones have registered and the registry entries
        of dead ones have expired (``SHOAL_HEARTBEAT_TTL_S``)."""
        deadline = time.monotonic() + timeout_s
        seen = None
        async with httpx.AsyncClient(
            timeout=5, headers=CommonSettings().cluster_keys().headers()
        ) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await client.get(self.gateway_url + "/readyz")
                    seen = r.json().get("instances")
                    if r.status_code == 200 and seen == n:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"the gateway saw {seen} instances, not {n}, for {timeout_s:.0f}s")

    # -- kill and restart ------------------------------------------------------
    def kill(self, slot: Slot) -> None:
        """SIGKILL the worker and everything it started (its process group and,
        should any have left it, its descendants), then reap it."""
        assert slot.server is not None
        proc = slot.server.proc
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        kill_group(proc)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait(30)

    def reap(self, slot: Slot) -> None:
        """After the worker exited by itself (the autoscaler stopped it): make
        sure nothing of its process group is left."""
        assert slot.server is not None
        kill_group(slot.server.proc)
        slot.server.proc.wait(30)

    async def relaunch(self, slot: Slot) -> float:
        """Start the slot again and wait until it serves; returns the seconds taken."""
        started = time.monotonic()
        self._launch(slot)
        await self._ready(slot.server)
        return time.monotonic() - started

    # -- the autoscaler --------------------------------------------------------
    async def start_autoscaler(self) -> None:
        """An autoscaler that starts nothing by itself (``static`` with a floor
        of 0: it only starts instances when none is left and requests are held),
        so all it does is pair: drain migrations, balancing, and stopping
        drained instances."""
        s = self.spec
        port = free_port()
        cmd = ["autoscaler", "--port", str(port), "--redis-url",
               self.redis_url, "--autoscaler-id", "soak-autoscaler", "--engine", s.engine,
               "--served-model-name", s.served_model, "--scaling-policy", "static",
               "--min-instances", "0", "--max-instances", str(s.instances),
               "--tick-s", str(s.autoscaler_tick_s)]  # fmt: skip
        self.autoscaler = Child.start(cmd, f"http://127.0.0.1:{port}/healthz", self._env(),
                                      s.logs / "autoscaler.log")  # fmt: skip
        await self._ready(self.autoscaler)
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(
            timeout=5, headers=CommonSettings().cluster_keys().headers()
        ) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    if (await client.get(self.autoscaler.ready_url)).json().get("leader"):
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError("the autoscaler did not take the lease in 30s")

    def stop_autoscaler(self) -> None:
        if self.autoscaler is not None:
            stop_all([self.autoscaler.proc], 30.0)
            self.autoscaler = None

    # -- shutdown ----------------------------------------------------------------
    def close(self) -> None:
        """Stop everything, autoscaler first (so it reacts to nothing), in any state."""
        # Earlier incarnations of a slot were killed or reaped with their group.
        servers = [self.autoscaler, self.gateway, *(s.server for s in self.slots)]
        stop_all([s.proc for s in servers if s is not None], 30.0)
        self.autoscaler = self.gateway = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

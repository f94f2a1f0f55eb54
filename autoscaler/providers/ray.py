"""``ray``: instance workers as Ray actors on a Ray cluster.

Each instance is one detached actor, ``shoal-<instance_id>`` in a Ray
namespace, that asks Ray for the engine's resources (``num_gpus``,
``num_cpus``, custom ``resources``) and runs ``shoal instance`` as a
subprocess on whichever node Ray placed it. Shoal's autoscaler decides *how
many* instances to run; Ray decides *where*, and Ray's own autoscaler decides
*which nodes exist*: an actor whose resources no node has stays pending, the
pending demand makes Ray's autoscaler launch a node, and idle nodes are
removed once their actors are gone. Until then the instance is simply
"starting" for the controller (and stopped after ``ScalingConfig.start_timeout_s``:
a ``start_timeout`` event).

The worker listens on the node's IP (``SHOAL_HOST``) and advertises it
(``SHOAL_ADVERTISE_HOST``, the worker's ``public_host``) so gateways and peer
instances on other nodes reach it. Stopping is graceful: the actor SIGTERMs
the worker (which finishes, deregisters and exits), SIGKILLs its process
group after ``stop_timeout_s``, and is then killed itself. The worker inherits
the actor's environment, so the devices Ray assigned (``CUDA_VISIBLE_DEVICES``)
are the engine's. One instance may span several GPUs: with tensor parallelism
the autoscaler asks for one GPU per rank (``AutoscalerSettings.gpus_per_instance``)
and passes ``--tensor-parallel-size`` to the worker, whose vLLM then runs one
rank per assigned device on that node.

Actors are detached so they outlive the autoscaler that started them: a
standby autoscaler connected to the same cluster finds them by name to stop
them, and adopts the ones it finds (``adopt``) once it leads, so that one
that never becomes ready is still stopped after its leader died. With no
cluster to join, :meth:`RayProvider.connect` starts one owned by this
process, which ends with it (and stops its workers on close): run ``ray start
--head`` for standbys to share a cluster.

``ray`` is imported lazily: importing this module does not require it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, Unpack

import psutil

from autoscaler.providers.base import WorkerLaunch
from infra.records import InstanceInfo

log = logging.getLogger(__name__)

ACTOR_PREFIX = "shoal-"


def _ray() -> Any:
    """The ``ray`` module, imported on first use (an optional dependency)."""
    import ray

    return ray


def actor_name(instance_id: str) -> str:
    return f"{ACTOR_PREFIX}{instance_id}"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _result(ref: Any, timeout_s: float) -> Any:
    """Await a Ray ObjectRef (plain or Ray Client) without blocking the loop."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


def _init(address: str | None, namespace: str) -> bool:
    """``ray.init``; True if that started a new cluster, owned by this process.
    Run in a thread, which also keeps Ray from replacing the process's SIGTERM
    handler."""
    _ray().init(address=address, namespace=namespace)
    # A cluster ray.init started runs its GCS as our child; one it joined does not.
    return any(p.name() == "gcs_server" for p in psutil.Process().children())


class InstanceActor:
    """The actor: one ``shoal instance`` subprocess on the actor's node.

    Run threaded (``max_concurrency`` > 1) so :meth:`poll` answers while
    :meth:`stop` waits for the worker to exit."""

    def __init__(self, launch: WorkerLaunch, instance_id: str, host: str | None,
                 log_dir: str | None) -> None:  # fmt: skip
        node_ip = str(_ray().util.get_node_ip_address())
        bind = host or node_ip
        if not os.path.exists(launch.python):  # another node's interpreter: use ours
            launch = dataclasses.replace(launch, python=sys.executable)
        log_root = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "shoal-ray"
        log_root.mkdir(parents=True, exist_ok=True)
        self.log_path = log_root / f"{instance_id}.log"
        env = {**os.environ, **launch.env, "SHOAL_HOST": bind, "SHOAL_ADVERTISE_HOST": node_ip}
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                launch.command(instance_id, _free_port(bind)), env=env, stdout=out,
                stderr=subprocess.STDOUT, process_group=0,
            )  # fmt: skip

    def poll(self) -> int | None:
        """The worker's exit code, or None while it runs."""
        return self._proc.poll()

    def stop(self, timeout_s: float) -> int:
        """SIGTERM the worker, SIGKILL its process group after ``timeout_s``;
        returns its exit code."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        return self._proc.wait()

    def log_tail(self, max_bytes: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - max_bytes))
            return f.read().decode(errors="replace")


@functools.cache
def _actor_class() -> Any:
    return _ray().remote(InstanceActor)


class RayOptions(TypedDict, total=False):
    """Keyword arguments of :class:`RayProvider` (see there)."""

    num_cpus: float
    num_gpus: float
    resources: Mapping[str, float] | None
    host: str | None
    log_dir: str | None
    stop_timeout_s: float
    check_interval_s: float
    probe_timeout_s: float
    adopt: bool
    stop_on_close: bool


class RayProvider:
    """Instances as detached Ray actors (see the module docstring).

    ``namespace``: Ray namespace of the actors (every autoscaler of one
    deployment must use the same). ``num_cpus`` (1), ``num_gpus`` (0; on GPU
    hosts one per tensor-parallel rank of an instance) and ``resources``
    (custom Ray resources, none): what each actor reserves. ``host``:
    interface workers listen on (None: the node's IP, which they advertise
    either way; both set over the launch's ``env``).
    ``log_dir``: workers' logs on their node (None: ``$TMPDIR/shoal-ray``).
    ``stop_timeout_s`` (60): SIGTERM to SIGKILL.
    ``check_interval_s`` (5): period of the liveness check behind
    :meth:`launched`. ``probe_timeout_s`` (10): how long :meth:`stop` waits for
    an actor not known to run to answer before killing it outright (it is
    probably still waiting for a node); also bounds each check's wait.
    ``adopt`` (True): the liveness check also takes over actors of the
    namespace started by other autoscalers.
    ``stop_on_close`` (False): :meth:`close` stops the workers instead of
    leaving them to a standby (for a cluster that ends with this process).

    Needs a Ray connection: use :meth:`connect`, or ``ray.init`` first."""

    name = "ray"

    def __init__(self, launch: WorkerLaunch, *, namespace: str = "shoal",
                 **options: Unpack[RayOptions]) -> None:  # fmt: skip
        self._launch = launch
        self._namespace = namespace
        self._num_cpus = options.get("num_cpus", 1.0)
        self._num_gpus = options.get("num_gpus", 0.0)
        self._resources = dict(options.get("resources") or {})
        self._host = options.get("host")
        self._log_dir = options.get("log_dir")
        self._stop_timeout_s = options.get("stop_timeout_s", 60.0)
        self._check_interval_s = options.get("check_interval_s", 5.0)
        self._probe_timeout_s = options.get("probe_timeout_s", 10.0)
        self._adopt = options.get("adopt", True)
        self._stop_on_close = options.get("stop_on_close", False)
        self._actors: dict[str, Any] = {}
        """Actor handles by instance id: what :meth:`launched` reports."""
        self._polls: dict[str, asyncio.Future[int | None]] = {}
        """Outstanding liveness polls (an actor waiting for a node answers late)."""
        self._running: set[str] = set()
        """Instances whose actor answered a poll: created, worker started."""
        self._stopped: set[str] = set()
        self._check_task: asyncio.Task[None] | None = None
        self._last_check = -float("inf")

    @classmethod
    async def connect(
        cls, launch: WorkerLaunch, *, address: str | None = None, namespace: str = "shoal",
        **options: Unpack[RayOptions],
    ) -> RayProvider:  # fmt: skip
        """Connect to Ray unless this process already is, and make a provider.

        ``address``: ``auto``, ``host:port`` or ``ray://host:port``; None means
        Ray's default: ``RAY_ADDRESS``, else the cluster ``ray start`` runs on
        this machine, else a new local one. A new one is owned by this process
        and its actors end with it, so the provider then stops them on
        :meth:`close` (``stop_on_close``)."""
        ray = _ray()
        owned = False
        if not ray.is_initialized():
            owned = await asyncio.to_thread(_init, address, namespace)
        options.setdefault("stop_on_close", owned)
        return cls(launch, namespace=namespace, **options)

    async def start(self, instance_id: str) -> None:
        """Submit the actor; returns at once, even if Ray must add a node first."""
        actor = await asyncio.to_thread(self._create_actor, instance_id)
        self._actors[instance_id] = actor
        self._stopped.discard(instance_id)
        log.info("started %s (actor %s in %s)", instance_id, actor_name(instance_id),
                 self._namespace)  # fmt: skip

    def _create_actor(self, instance_id: str) -> Any:
        cls = _actor_class().options(
            name=actor_name(instance_id), namespace=self._namespace, lifetime="detached",
            num_cpus=self._num_cpus, num_gpus=self._num_gpus, resources=self._resources,
            max_restarts=0, max_concurrency=4,
        )  # fmt: skip
        return cls.remote(self._launch, instance_id, self._host, self._log_dir)

    async def stop(self, instance_id: str, info: InstanceInfo | None) -> None:
        """Stop the worker gracefully, then its actor. Finds actors another
        autoscaler started by name."""
        self._stopped.add(instance_id)
        running = info is not None or instance_id in self._running  # else maybe no node yet
        actor = self._actors.get(instance_id)
        self._forget(instance_id)
        actor = actor or await self._lookup(instance_id)
        if actor is None:
            log.warning("cannot stop %s: no actor %s in Ray namespace %s", instance_id,
                        actor_name(instance_id), self._namespace)  # fmt: skip
            return
        ray = _ray()
        try:
            if running or await self._answers(actor):
                code = await _result(actor.stop.remote(self._stop_timeout_s),
                                     self._stop_timeout_s + 30)  # fmt: skip
                log.info("%s exited with %s", instance_id, code)
        except (ray.exceptions.RayActorError, TimeoutError) as exc:
            log.warning("stopping %s: %s", instance_id, exc)
        await asyncio.to_thread(ray.kill, actor, no_restart=True)

    async def _answers(self, actor: Any) -> bool:
        try:
            await _result(actor.poll.remote(), self._probe_timeout_s)
        except TimeoutError:
            return False
        return True

    async def _lookup(self, instance_id: str) -> Any:
        ray = _ray()
        try:
            return await asyncio.to_thread(ray.get_actor, actor_name(instance_id),
                                           namespace=self._namespace)  # fmt: skip
        except ValueError:  # no such (live) actor
            return None

    async def log_tail(self, instance_id: str, max_bytes: int = 8000) -> str:
        """The end of the worker's log, read on its node (for diagnostics)."""
        actor = self._actors.get(instance_id) or await self._lookup(instance_id)
        if actor is None:
            return f"(no actor {actor_name(instance_id)})"
        try:
            return str(await _result(actor.log_tail.remote(max_bytes), self._probe_timeout_s))
        except Exception as exc:
            return f"(log of {instance_id} unavailable: {type(exc).__name__}: {exc})"

    def launched(self) -> list[str]:
        """Instances whose actor is not known to be dead; never blocks. Starts
        a liveness check in the background every ``check_interval_s``."""
        now = time.monotonic()
        idle = self._check_task is None or self._check_task.done()
        if idle and now - self._last_check >= self._check_interval_s:
            with contextlib.suppress(RuntimeError):  # no running loop: check later
                self._check_task = asyncio.get_running_loop().create_task(self.check())
                self._last_check = now
        return sorted(self._actors)

    async def check(self) -> None:
        """Poll every actor (adopting the namespace's others first); forget
        those that died and kill those whose worker exited."""
        try:
            if self._adopt:
                await self._adopt_actors()
            for instance_id, actor in self._actors.items():
                if instance_id not in self._polls:
                    self._polls[instance_id] = asyncio.wrap_future(actor.poll.remote().future())
            if self._polls:  # unanswered polls stay outstanding for the next check
                timeout_s = min(self._probe_timeout_s, self._check_interval_s)
                await asyncio.wait(list(self._polls.values()), timeout=timeout_s)
            for instance_id, poll in list(self._polls.items()):
                if poll.done():
                    del self._polls[instance_id]
                    await self._checked(instance_id, poll)
        except Exception:
            log.exception("liveness check of Ray actors failed")

    async def _checked(self, instance_id: str, poll: asyncio.Future[int | None]) -> None:
        ray = _ray()
        actor = self._actors.get(instance_id)
        if actor is None:  # stopped meanwhile
            return
        try:
            code = poll.result()
        except ray.exceptions.ActorUnavailableError:
            return  # transient (node or network trouble): ask again next time
        except ray.exceptions.RayActorError as exc:
            log.warning("%s: actor died: %s", instance_id, exc)
            self._forget(instance_id)
            return
        except Exception as exc:  # anything else Ray raises: keep it, ask again
            log.warning("%s: liveness poll failed: %s: %s", instance_id, type(exc).__name__, exc)
            return
        if code is None:
            self._running.add(instance_id)
            return
        log.warning("%s exited with %s; killing its actor", instance_id, code)
        self._forget(instance_id)
        await asyncio.to_thread(ray.kill, actor, no_restart=True)

    def _forget(self, instance_id: str) -> None:
        self._actors.pop(instance_id, None)
        poll = self._polls.pop(instance_id, None)
        if poll is not None:
            poll.cancel()  # its outcome no longer matters
        self._running.discard(instance_id)

    async def _adopt_actors(self) -> None:
        ray = _ray()
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        names = {e["name"] for e in named if e["namespace"] == self._namespace}
        self._stopped &= {n.removeprefix(ACTOR_PREFIX) for n in names}  # the rest are gone
        for name in sorted(names):
            instance_id = name.removeprefix(ACTOR_PREFIX)
            if (not name.startswith(ACTOR_PREFIX) or instance_id in self._actors
                    or instance_id in self._stopped):  # fmt: skip
                continue
            actor = await self._lookup(instance_id)
            if actor is not None and instance_id not in self._stopped:
                log.info("adopted %s (actor %s)", instance_id, name)
                self._actors.setdefault(instance_id, actor)

    async def close(self) -> None:
        """Forget the actors without stopping them: detached, they outlive this
        process, for a standby autoscaler to adopt and stop. With
        ``stop_on_close``, stop them instead."""
        if self._check_task is not None:
            self._check_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check_task
        if self._stop_on_close:
            await asyncio.gather(*(self.stop(i, None) for i in list(self._actors)))
        for instance_id in list(self._actors):
            self._forget(instance_id)

"""The ``ray`` provider on a real local Ray cluster started by this test: a
sim-engine worker launched as a detached actor registers, serves, and is
stopped by a second provider object (a standby autoscaler) that finds it by
name; the first provider's liveness check then drops it. Nothing of Ray or of
the worker outlives the module."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from redis.asyncio import Redis

from autoscaler.main import worker_launch
from autoscaler.providers.base import WorkerLaunch
from autoscaler.providers.ray import RayProvider, actor_name
from infra.keys import KeySchema
from infra.records import InstanceInfo
from infra.settings import AutoscalerSettings
from infra.store import StateStore

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

NAMESPACE = f"raytest-{uuid.uuid4().hex[:6]}"
"""Both the Ray namespace of the actors and the Shoal (Redis) namespace."""
INSTANCE_ID = f"ray-{uuid.uuid4().hex[:6]}"
WAIT_S = 120.0
"""Bound on every wait (the cluster and the worker start in seconds here)."""


def _worker_processes() -> list[psutil.Process]:
    """Processes running this module's instance worker."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if INSTANCE_ID in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def ray_cluster(redis_url: str) -> Iterator[None]:
    """A small local cluster owned by the test process, shut down at the end;
    checks that none of its processes (nor the worker) is left. (After Redis:
    the session's Valkey server is no leftover.)"""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    # Two GPUs declared (none needed): Ray assigns them to actors all the same.
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False, namespace=NAMESPACE)  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 30
        while True:
            left = [p for p in me.children(recursive=True) if p.pid not in before and _alive(p)]
            left += _worker_processes()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for proc in left:
            proc.kill()
        assert not left, f"left running after ray.shutdown(): {[p.cmdline() for p in left]}"


async def _eventually(
    check: Callable[[], Awaitable[bool]], what: str, explain: Callable[[], Awaitable[str]]
) -> None:
    """Poll ``check`` until true, failing after ``WAIT_S`` (a bound, not a timing assertion)."""
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {WAIT_S}s\n{await explain()}")
        await asyncio.sleep(0.2)


async def _actor_gone() -> bool:
    try:
        await asyncio.to_thread(ray.get_actor, actor_name(INSTANCE_ID), namespace=NAMESPACE)
    except ValueError:
        return True
    return False


async def test_launch_serve_and_stop_from_a_standby(
    ray_cluster: None, redis_url: str, tmp_path: Path
) -> None:
    # An instance spanning two GPUs, as the autoscaler launches it.
    settings = AutoscalerSettings(engine="sim", tensor_parallel_size=2, ray_num_gpus=2)
    launch = worker_launch(settings, redis_url)
    launch = WorkerLaunch(engine="sim", args=launch.args,
                          env={**launch.env, "SHOAL_NAMESPACE": NAMESPACE})  # fmt: skip
    leader = RayProvider(launch, namespace=NAMESPACE, num_cpus=0.5,
                         num_gpus=settings.gpus_per_instance, log_dir=str(tmp_path),
                         check_interval_s=0.2, stop_timeout_s=30)  # fmt: skip
    standby = RayProvider(launch, namespace=NAMESPACE, num_cpus=0.5, stop_timeout_s=30)
    redis = Redis.from_url(redis_url)
    store = StateStore(redis, KeySchema(NAMESPACE))

    async def registered() -> InstanceInfo | None:
        views = {v.info.instance_id: v.info for v in await store.list_instances()}
        return views.get(INSTANCE_ID)

    async def explain() -> str:
        log_path = tmp_path / f"{INSTANCE_ID}.log"  # on this machine: readable after the actor
        log = log_path.read_text(errors="replace")[-8000:] if log_path.exists() else "(none)"
        return f"launched: {leader.launched()}\nworker log:\n{log}"

    try:
        await leader.start(INSTANCE_ID)
        assert leader.launched() == [INSTANCE_ID]
        await _eventually(lambda: _is(registered(), True), "registration", explain)
        info = await registered()
        assert info is not None and info.engine == "sim"
        assert f"instance {INSTANCE_ID} serving" in await leader.log_tail(INSTANCE_ID)
        (proc,) = _worker_processes()  # on the two GPUs Ray gave its actor
        assert len(proc.environ()["CUDA_VISIBLE_DEVICES"].split(",")) == 2
        assert "--tensor-parallel-size 2" in " ".join(proc.cmdline())
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            resp = await client.post(f"{info.address}/generate",
                                     json={"prompt": "hi", "max_tokens": 4})  # fmt: skip
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["token_ids"]) == 4
        assert leader.launched() == [INSTANCE_ID]
        adopter = RayProvider(launch, namespace=NAMESPACE)  # a new leader adopts it ...
        await adopter.check()
        assert adopter.launched() == [INSTANCE_ID]
        await adopter.close()  # ... and forgets it, leaving it running

        await standby.stop(INSTANCE_ID, info)
        await _eventually(lambda: _is(registered(), False), "deregistration", explain)
        await _eventually(_actor_gone, "the actor's end", explain)
        await _eventually(_no_worker_process, "the worker's exit", explain)
        await _eventually(lambda: _dropped(leader), "the leader dropping it", explain)
    finally:
        if not await _actor_gone():
            await standby.stop(INSTANCE_ID, None)
        await leader.close()
        await standby.close()
        await redis.aclose()


async def test_an_actor_waiting_for_resources_is_launched_until_stopped(
    ray_cluster: None, redis_url: str
) -> None:
    """More CPUs than the cluster has: on a real cluster Ray's autoscaler
    would add a node; here the actor stays pending. It counts as launched
    (starting), and stopping it kills it without waiting for a node."""
    launch = WorkerLaunch(engine="sim", env={"SHOAL_REDIS_URL": redis_url})
    provider = RayProvider(launch, namespace=NAMESPACE, num_cpus=64, probe_timeout_s=1.0)
    pending = f"{INSTANCE_ID}-pending"
    try:
        await provider.start(pending)
        await provider.check()
        assert provider.launched() == [pending]
        await provider.stop(pending, None)
        assert provider.launched() == []
        with pytest.raises(ValueError):
            ray.get_actor(actor_name(pending), namespace=NAMESPACE)
    finally:
        await provider.close()


async def _is(info: Awaitable[InstanceInfo | None], present: bool) -> bool:
    return (await info is not None) is present


async def _no_worker_process() -> bool:
    return not _worker_processes()


async def _dropped(provider: RayProvider) -> bool:
    return INSTANCE_ID not in provider.launched()

"""Assemble and run an autoscaler from settings (``shoal autoscaler``).

Any number may run; the lease lets one act while the others stand by. Each
serves ``/metrics`` and ``/healthz`` (``/healthz`` reports whether it leads)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from autoscaler.controller import Controller, ControllerConfig
from autoscaler.instances import HttpInstanceApi
from autoscaler.leader import LeaderLease
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policies import PairingConfig, ScalingConfig
from autoscaler.providers import Provider, WorkerLaunch
from autoscaler.providers.local import LocalProvider
from infra.demand import DemandBoard
from infra.embedded_redis import resolve_redis
from infra.events import EventLog
from infra.keys import KeySchema
from infra.serving import run_server
from infra.settings import AutoscalerSettings
from infra.status import AutoscalerBoard
from infra.store import StateStore
from infra.telemetry import new_registry
from infra.traffic_board import TrafficBoard

log = logging.getLogger(__name__)


def controller_config(s: AutoscalerSettings) -> ControllerConfig:
    """The controller's and the policies' configs from the settings: every
    field of theirs that the settings also have (``SHOAL_<NAME>``,
    ``--<name>``) is taken from there by name; the rest keep their defaults."""
    return ControllerConfig(
        scaling=ScalingConfig(**_same_names(ScalingConfig, s)),
        pairing=PairingConfig(**_same_names(PairingConfig, s)),
        **_same_names(ControllerConfig, s),
    )


_SETTING_NAMES = frozenset({*AutoscalerSettings.model_fields, "model_name"})
"""What the settings offer by name: their fields, and ``model_name`` (a
property: the served name, derived from ``model``/``served_model_name``)."""


def _same_names(config: type[Any], s: AutoscalerSettings) -> dict[str, Any]:
    """The settings' values of the dataclass ``config``'s fields, by name."""
    return {f.name: getattr(s, f.name) for f in fields(config) if f.name in _SETTING_NAMES}


def worker_launch(s: AutoscalerSettings, redis_url: str) -> WorkerLaunch:
    """How the provider starts each instance: the extra arguments, the model,
    and the tensor-parallel size its GPUs are requested for."""
    args = [*shlex.split(s.instance_args), "--tensor-parallel-size", str(s.tensor_parallel_size)]
    if s.model:
        args += ["--model", s.model]
    if s.served_model_name:
        args += ["--served-model-name", s.served_model_name]
    env = {
        "SHOAL_REDIS_URL": redis_url,
        "SHOAL_NAMESPACE": s.namespace,
        **s.cluster_keys().env(),
        **s.cluster_tls().env(),
    }
    return WorkerLaunch(engine=s.engine, args=tuple(args), env=env)


async def build_provider(s: AutoscalerSettings, launch: WorkerLaunch) -> Provider:
    if s.provider == "ray":
        from autoscaler.providers.ray import RayProvider

        ray: Provider = await RayProvider.connect(
            launch, address=s.ray_address, namespace=s.namespace, num_gpus=s.gpus_per_instance,
            num_cpus=s.ray_num_cpus,
        )  # fmt: skip
        return ray
    return LocalProvider(launch, Path(s.run_dir) / "logs")


def create_app(controller: Controller, metrics: AutoscalerMetrics) -> FastAPI:
    app = FastAPI(title="Shoal autoscaler")

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "id": controller.me, "leader": controller.is_leader}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(settings: AutoscalerSettings) -> None:
    url, owned_redis = resolve_redis(settings.redis_url, settings.run_dir)
    assert url is not None
    redis = Redis.from_url(url)
    keys = KeySchema(settings.namespace)
    me = settings.autoscaler_id or f"autoscaler-{uuid.uuid4().hex[:6]}"
    metrics = AutoscalerMetrics(new_registry())
    instances = HttpInstanceApi(settings.cluster_keys(), tls=settings.cluster_tls())
    provider = await build_provider(settings, worker_launch(settings, url))
    controller = Controller(
        config=controller_config(settings), registry=StateStore(redis, keys), provider=provider,
        instances=instances, lease=LeaderLease(redis, keys.leader, me, settings.lease_ttl_s),
        events=EventLog(redis, keys.events), demand=DemandBoard(redis, keys),
        board=AutoscalerBoard(redis, keys), metrics=metrics, traffic=TrafficBoard(redis, keys),
    )  # fmt: skip
    stop = asyncio.Event()
    loop_task = asyncio.create_task(controller.run(stop), name="autoscaler")
    log.info("autoscaler %s: %s provider, %s engine, model %s, tensor parallel %d "
             "(%g GPUs per instance on ray)", me, settings.provider, settings.engine,
             settings.model_name, settings.tensor_parallel_size,
             settings.gpus_per_instance)  # fmt: skip
    try:
        await run_server(create_app(controller, metrics), settings.host, settings.port)
    finally:
        stop.set()
        try:
            await loop_task
        finally:  # (the loop fails when Redis has gone; its workers must stop all the same)
            await provider.close()
        await instances.close()
        await redis.aclose()
        if owned_redis is not None:
            owned_redis.stop()

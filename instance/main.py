"""Assemble and run an instance worker from settings (``shoal instance``)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

from redis.asyncio import Redis

from infra.cluster_auth import ClusterKeys, Purpose
from infra.embedded_redis import resolve_redis
from infra.keys import KeySchema
from infra.serving import run_server
from infra.settings import InstanceSettings
from infra.store import StateStore
from infra.telemetry import make_tracer, new_registry
from infra.tls import PLAIN, ClusterTls
from instance.engine import Engine
from instance.engine_args import CPU, detect_platform, engine_args
from instance.metrics import InstanceMetrics
from instance.reporter import ReporterConfig
from instance.server import create_app
from instance.worker import InstanceWorker, WorkerConfig

log = logging.getLogger(__name__)

SIM_DEFAULT_BLOCK_SIZE = 16


def build_engine(
    settings: InstanceSettings, keys: ClusterKeys, tls: ClusterTls = PLAIN
) -> tuple[Engine, str, int | None]:
    """The engine, the served model name and the vocabulary size (if known);
    its KV port serves holders of ``keys``' KV credential, over TLS if ``tls``
    says so."""
    if settings.engine == "sim":
        return _build_sim(settings, keys, tls)

    from instance.tiny_model import TINY_MODEL_NAME
    from instance.vllm_engine import VllmEngine, VllmOptions, resolve_model

    if settings.cpu_threads_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
    # The KV connector reads them in vLLM's processes.
    os.environ.update({**keys.env(), **tls.env()})
    model = resolve_model(settings.model, settings.cache_dir)
    args = engine_args(settings, detect_platform(), model)
    log.info("vLLM engine arguments\n%s", args.describe())
    ranks = args.tensor_parallel_size
    engine = VllmEngine(
        VllmOptions(
            args=args,
            kv_endpoint=(
                f"{settings.public_host}:{pick_ports(settings.host, settings.kv_port, ranks)}"
                if settings.kv_transfer
                else None
            ),
            kv_auth=keys.token(Purpose.KV),
            kv_tls=tls,
            kv_transport=settings.kv_transport,
            kv_pace_bytes_per_s=settings.kv_pace_mib_s * 1024 * 1024,
            tool_call_parser=settings.tool_call_parser
            if settings.enable_auto_tool_choice
            else None,
            reasoning_parser=settings.reasoning_parser,
        )
    )
    name = settings.served_model_name or settings.model or TINY_MODEL_NAME
    return engine, name, engine.tokenizer.vocab_size


def _build_sim(
    settings: InstanceSettings, keys: ClusterKeys, tls: ClusterTls
) -> tuple[Engine, str, int | None]:
    """The sim engine; with ``kv_transfer`` it serves simulated KV blocks on
    ``kv_port`` and models transfer time from the ``sim_kv_*`` settings."""
    from instance.sim.core import SimConfig
    from instance.sim.engine import SimEngine
    from instance.sim.kv import KvTransferModel, SimKvOptions
    from instance.sim.latency import LatencyModel

    # The sim takes the CPU defaults for the limits left unset.
    limits = engine_args(settings, CPU, "sim-model")
    assert limits.max_num_seqs is not None and limits.max_model_len is not None
    config = SimConfig(
        num_blocks=settings.num_sim_blocks,
        block_size=settings.block_size or SIM_DEFAULT_BLOCK_SIZE,
        max_num_seqs=limits.max_num_seqs,
        latency=LatencyModel().scaled(settings.sim_speedup),
    )
    kv = None
    if settings.kv_transfer:
        link = KvTransferModel(
            bytes_per_token=settings.sim_kv_bytes_per_token,
            bandwidth_bytes_per_s=settings.sim_kv_bandwidth_gbps * 1e9 / 8,
            latency_s=settings.sim_kv_latency_ms / 1000,
        )
        kv = SimKvOptions(
            endpoint=f"{settings.public_host}:{_pick_port(settings.host, settings.kv_port)}",
            model=link.scaled(settings.sim_speedup),
            listen_host=settings.host,
            keys=keys,
            tls=tls,
        )
    name = settings.served_model_name or settings.model or "sim-model"
    engine = SimEngine(config, max_model_len=limits.max_model_len, kv=kv,
                       startup_s=settings.sim_startup_s)  # fmt: skip
    return engine, name, 256


def _pick_port(host: str, port: int) -> int:
    return pick_ports(host, port, 1)


def pick_ports(host: str, port: int, count: int, *, attempts: int = 50) -> int:
    """The first of ``count`` consecutive ports on ``host``: ``port`` itself if
    given (the caller owns ``port`` .. ``port + count - 1``), else a run of
    free ones (one KV connector per tensor-parallel rank listens on each)."""
    if port:
        return port
    for _ in range(attempts):
        with contextlib.ExitStack() as held:
            first = _bind(held, host, 0)
            if first + count - 1 > 65535:
                continue
            try:
                for p in range(first + 1, first + count):
                    _bind(held, host, p)
            except OSError:
                continue
            return first
    raise OSError(f"no {count} consecutive free ports on {host} after {attempts} attempts")


def _bind(held: contextlib.ExitStack, host: str, port: int) -> int:
    """Bind a socket to ``host:port`` (0: any free one) for as long as ``held``."""
    sock = held.enter_context(socket.socket())
    sock.bind((host, port))
    return int(sock.getsockname()[1])


async def serve(settings: InstanceSettings) -> None:
    """Run the worker until interrupted; owns every resource it opens. With
    no cluster secret (and no explicit open cluster) it does not start."""
    keys = settings.cluster_keys()
    tls = settings.cluster_tls()
    if keys.is_open:
        log.warning(
            "OPEN CLUSTER (SHOAL_INSECURE_OPEN_CLUSTER): this instance serves "
            "its requests, migrations and KV blocks to anyone who reaches its ports"
        )
    url, owned_redis = resolve_redis(settings.redis_url, settings.run_dir)
    assert url is not None
    redis = Redis.from_url(url)
    try:
        store = StateStore(redis, KeySchema(settings.namespace))
        engine, served_name, vocab = build_engine(settings, keys, tls)
        port = _pick_port(settings.host, settings.port)
        instance_id = settings.instance_id or f"{settings.engine}-{uuid.uuid4().hex[:8]}"
        config = WorkerConfig(
            instance_id=instance_id,
            address=f"{tls.scheme}://{settings.public_host}:{port}",
            served_model_name=served_name,
            vocab_size=vocab,
            resume_timeout_s=settings.resume_timeout_s,
            report=ReporterConfig(
                interval_s=settings.report_interval_s,
                ttl_s=settings.heartbeat_ttl_s,
                headroom_blocks=settings.high_priority_headroom_blocks,
            ),
        )
        worker = InstanceWorker(engine, config, store, InstanceMetrics(new_registry()))
        app = create_app(
            worker,
            keys=keys,
            tls=tls,
            allow_direct=settings.allow_direct_requests,
            tracer=make_tracer("shoal-instance", settings.otlp_endpoint),
            max_body_bytes=settings.max_body_bytes,
        )
        log.info("instance %s serving %s on %s", instance_id, served_name, config.address)
        await run_server(app, settings.host, port, tls=tls)
    finally:
        await redis.aclose()
        if owned_redis is not None:
            owned_redis.stop()

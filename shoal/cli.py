"""The ``shoal`` command line: one entry point, a subcommand per component."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from infra.settings import CommonSettings, InstanceSettings

log = logging.getLogger("shoal")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Client libraries log every HTTP request at INFO: one line per call.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine on uvloop (several times cheaper per
    request than the default loop; see docs/BENCHMARKS.md)."""
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main)


def _overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# -- shoal instance ----------------------------------------------------------
_INSTANCE_FLAGS = {
    "engine": dict(choices=["vllm", "sim"], help="engine behind the worker (default vllm)"),
    "model": dict(help="HF model id or path (default: the generated tiny model)"),
    "served_model_name": dict(help="model name clients use"),
    "host": dict(help="listen address (default 127.0.0.1)"),
    "port": dict(type=int, help="listen port (0 = any free port; default 8100)"),
    "instance_id": dict(help="stable instance id (default: random)"),
    "max_num_seqs": dict(type=int, help="largest batch"),
    "max_model_len": dict(type=int, help="longest sequence"),
    "block_size": dict(type=int, help="tokens per KV block"),
    "kv_cache_bytes": dict(type=int, help="vLLM CPU KV-cache bytes"),
    "num_sim_blocks": dict(type=int, help="sim engine KV capacity in blocks"),
    "sim_speedup": dict(type=float, help="sim engine speed factor"),
    "sim_startup_s": dict(type=float, help="sim engine modelled start-up time"),
    "cpu_threads_bind": dict(help="cores for the vLLM CPU engine, e.g. 0"),
    "redis_url": dict(help="Redis URL (default: embedded server)"),
}


def _cmd_instance(args: argparse.Namespace) -> int:
    from instance.main import serve

    settings = InstanceSettings(**_overrides(args, list(_INSTANCE_FLAGS)))
    _setup_logging(settings.log_level)
    _run_server(serve(settings))
    return 0


# -- shoal gateway -----------------------------------------------------------
def _cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.main import serve
    from infra.settings import GatewaySettings

    settings = GatewaySettings(**_overrides(args, ["host", "port", "dispatch_policy", "redis_url"]))
    _setup_logging(settings.log_level)
    _run_server(serve(settings))
    return 0


# -- shoal autoscaler --------------------------------------------------------
_AUTOSCALER_FLAGS = {
    "host": dict(help="listen address of /metrics and /healthz (default 127.0.0.1)"),
    "port": dict(type=int, help="listen port (default 8200)"),
    "autoscaler_id": dict(help="name in the lease and events (default: random)"),
    "provider": dict(choices=["local", "ray"], help="where instances run (default local)"),
    "ray_address": dict(help="Ray cluster address (default: start a local one)"),
    "engine": dict(choices=["vllm", "sim"], help="engine of the instances (default vllm)"),
    "model": dict(help="model the instances serve (default: the tiny model)"),
    "served_model_name": dict(help="model name clients use"),
    "instance_args": dict(help="extra `shoal instance` arguments, quoted"),
    "min_instances": dict(type=int, help="never fewer (0 allows scale to zero; default 1)"),
    "max_instances": dict(type=int, help="never more (default 4)"),
    "freeness_low": dict(type=float, help="scale out below this average freeness"),
    "freeness_high": dict(type=float, help="scale in above this average freeness"),
    "idle_timeout_s": dict(type=float, help="scale to zero after this long idle"),
    "cooldown_s": dict(type=float, help="no scaling change for this long after one"),
    "scale_out_ticks": dict(type=int, help="ticks below the band before scaling out"),
    "scale_in_ticks": dict(type=int, help="ticks above the band before scaling in"),
    "scaling_policy": dict(help="band (default) or static"),
    "pairing_policy": dict(help="llumnix (default) or none"),
    "tick_s": dict(type=float, help="control-loop period (default 0.5)"),
    "redis_url": dict(help="Redis URL (default: embedded server)"),
}


def _cmd_autoscaler(args: argparse.Namespace) -> int:
    from autoscaler.main import serve
    from infra.settings import AutoscalerSettings

    settings = AutoscalerSettings(**_overrides(args, list(_AUTOSCALER_FLAGS)))
    _setup_logging(settings.log_level)
    _run_server(serve(settings))
    return 0


# -- shoal up ----------------------------------------------------------------
def _cmd_up(args: argparse.Namespace) -> int:
    from shoal.up import run_up

    _setup_logging("WARNING")
    return run_up(instances=args.instances, engine=args.engine, model=args.model,
                  port=args.port, base_port=args.base_port)  # fmt: skip


# -- shoal keys add NAME -----------------------------------------------------
def _cmd_keys_add(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from gateway.auth import ApiKey, KeyRing, digest, new_key
    from infra.embedded_redis import resolve_redis
    from infra.keys import KeySchema
    from infra.records import Priority

    settings = CommonSettings(**_overrides(args, ["redis_url"]))
    url, _ = resolve_redis(settings.redis_url, settings.run_dir, start=False)
    if url is None:
        print("shoal keys: no Redis (set SHOAL_REDIS_URL or start `make up`)", file=sys.stderr)
        return 1
    secret = new_key()
    key = ApiKey(name=args.name, sha256=digest(secret), max_priority=Priority(args.max_priority),
                 requests_per_min=args.rpm, tokens_per_min=args.tpm)  # fmt: skip

    async def add() -> None:
        redis = Redis.from_url(url)
        try:
            await KeyRing(redis, KeySchema(settings.namespace), {}).add(key)
        finally:
            await redis.aclose()

    asyncio.run(add())
    print(secret)
    return 0


# -- shoal model tiny DIR ----------------------------------------------------
def _cmd_model_tiny(args: argparse.Namespace) -> int:
    from instance.tiny_model import build_tiny_model

    _setup_logging("INFO")
    path = build_tiny_model(Path(args.dir), seed=args.seed)
    print(path)
    return 0


# -- shoal status ------------------------------------------------------------
def _cmd_status(args: argparse.Namespace) -> int:
    from infra.status import collect_status, render_table

    settings = CommonSettings(**_overrides(args, ["redis_url"]))
    _setup_logging("WARNING")
    while True:
        try:
            status = asyncio.run(collect_status(settings))
        except ConnectionError as exc:
            print(f"shoal status: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(status.model_dump_json(indent=2))
        else:
            if args.watch:
                print("\x1b[H\x1b[2J", end="")  # clear the terminal
            print(render_table(status), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


# -- shoal migrate -----------------------------------------------------------
def _cmd_migrate(args: argparse.Namespace) -> int:
    from migration.cli import MigrateError, migrate, render

    settings = CommonSettings(**_overrides(args, ["redis_url"]))
    _setup_logging("WARNING")
    try:
        records = asyncio.run(migrate(
            settings, args.source, args.destination, request_ids=args.request_ids,
            count=args.count, mode=args.mode, policy=args.policy,
        ))  # fmt: skip
    except (ConnectionError, MigrateError) as exc:
        print(f"shoal migrate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    else:
        print(render(records))
    return 0 if all(r.outcome.value == "migrated" for r in records) else 2


# -- shoal redis -------------------------------------------------------------
def _cmd_redis(args: argparse.Namespace) -> int:
    from infra.embedded_redis import resolve_redis

    settings = CommonSettings()
    _setup_logging(settings.log_level)
    url, server = resolve_redis(None, settings.run_dir)
    if server is None:
        print(f"already running: {url}")
        return 0
    print(json.dumps({"url": url}), flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    inst = sub.add_parser("instance", help="run an instance worker")
    for name, kw in _INSTANCE_FLAGS.items():
        inst.add_argument("--" + name.replace("_", "-"), dest=name, **kw)  # type: ignore[arg-type]
    inst.set_defaults(func=_cmd_instance)

    from gateway.policies import DISPATCH

    gw = sub.add_parser("gateway", help="run an OpenAI-compatible gateway replica")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int, help="default 8000")
    gw.add_argument("--dispatch-policy", dest="dispatch_policy", choices=DISPATCH.names())
    gw.add_argument("--redis-url", dest="redis_url")
    gw.set_defaults(func=_cmd_gateway)

    scaler = sub.add_parser("autoscaler", help="run the autoscaler (one leads, others stand by)")
    for name, kw in _AUTOSCALER_FLAGS.items():
        scaler.add_argument("--" + name.replace("_", "-"), dest=name, **kw)  # type: ignore[arg-type]
    scaler.set_defaults(func=_cmd_autoscaler)

    up = sub.add_parser("up", help="start Redis, instances and a gateway; Ctrl-C stops all")
    up.add_argument("--instances", type=int, default=int(os.environ.get("INSTANCES", "2")))
    up.add_argument("--engine", choices=["vllm", "sim"], default=os.environ.get("ENGINE", "vllm"))
    up.add_argument("--model", default=os.environ.get("MODEL") or None)
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--base-port", type=int, default=8100, help="first instance port")
    up.set_defaults(func=_cmd_up)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create a key in Redis and print it (once)")
    add.add_argument("name")
    add.add_argument("--max-priority", default="normal", choices=["high", "normal", "low"])
    add.add_argument("--rpm", type=int, help="requests per minute")
    add.add_argument("--tpm", type=int, help="tokens per minute")
    add.add_argument("--redis-url", dest="redis_url")
    add.set_defaults(func=_cmd_keys_add)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="write the tiny test model to DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_model_tiny)

    status = sub.add_parser("status", help="list registered instances and their load")
    status.add_argument("--json", action="store_true", help="stable JSON (docs/STATE.md)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="--watch period (s)")
    status.add_argument("--redis-url", dest="redis_url")
    status.set_defaults(func=_cmd_status)

    redis = sub.add_parser("redis", help="run this checkout's embedded Valkey server")
    redis.set_defaults(func=_cmd_redis)

    mig = sub.add_parser("migrate", help="live-migrate running requests between instances")
    mig.add_argument("--from", dest="source", required=True, help="source instance id")
    mig.add_argument("--to", dest="destination", required=True, help="destination instance id")
    which = mig.add_mutually_exclusive_group()
    which.add_argument("--request", dest="request_ids", action="append",
                       help="request id to move (repeatable)")  # fmt: skip
    which.add_argument("--count", type=int, help="move this many, chosen by --policy")
    from migration.policies import SELECTION

    mig.add_argument("--policy", choices=SELECTION.names(), help=SELECTION.describe())
    mig.add_argument("--mode", default="auto", choices=["auto", "kv", "recompute"])
    mig.add_argument("--json", action="store_true", help="the migration records as JSON")
    mig.add_argument("--redis-url", dest="redis_url")
    mig.set_defaults(func=_cmd_migrate)
    from bench.cli import add_bench_commands

    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

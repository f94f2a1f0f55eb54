"""The ``shoal`` subcommands that are tools rather than servers: ``keys``,
``model``, ``status``, ``redis`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TypeAlias

from infra.settings import CommonSettings

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _settings(args: argparse.Namespace) -> CommonSettings:
    return CommonSettings(**({"redis_url": args.redis_url} if args.redis_url else {}))


# -- shoal keys add NAME -----------------------------------------------------
def _cmd_keys_add(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from gateway.auth import ApiKey, KeyRing, digest, new_key
    from infra.embedded_redis import resolve_redis
    from infra.keys import KeySchema
    from infra.records import Priority

    settings = _settings(args)
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


def _add_keys(sub: Subparsers) -> None:
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create a key in Redis and print it (once)")
    add.add_argument("name")
    add.add_argument("--max-priority", default="normal", choices=["high", "normal", "low"])
    add.add_argument("--rpm", type=int, help="requests per minute")
    add.add_argument("--tpm", type=int, help="tokens per minute")
    add.add_argument("--redis-url", dest="redis_url")
    add.set_defaults(func=_cmd_keys_add)


# -- shoal model tiny DIR ----------------------------------------------------
def _cmd_model_tiny(args: argparse.Namespace) -> int:
    from instance.tiny_model import build_tiny_model
    from shoal.cli import setup_logging

    setup_logging("INFO")
    print(build_tiny_model(Path(args.dir), seed=args.seed))
    return 0


def _add_model(sub: Subparsers) -> None:
    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="write the tiny test model to DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_model_tiny)


# -- shoal status ------------------------------------------------------------
def _cmd_status(args: argparse.Namespace) -> int:
    from infra.status import collect_status, render_table

    settings = _settings(args)
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


def _add_status(sub: Subparsers) -> None:
    status = sub.add_parser("status", help="list registered instances and their load")
    status.add_argument("--json", action="store_true", help="stable JSON (docs/STATE.md)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="--watch period (s)")
    status.add_argument("--redis-url", dest="redis_url")
    status.set_defaults(func=_cmd_status)


# -- shoal redis -------------------------------------------------------------
def _cmd_redis(args: argparse.Namespace) -> int:
    from infra.embedded_redis import resolve_redis
    from shoal.cli import setup_logging

    settings = CommonSettings()
    setup_logging(settings.log_level)
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


def _add_redis(sub: Subparsers) -> None:
    redis = sub.add_parser("redis", help="run this checkout's embedded Valkey server")
    redis.set_defaults(func=_cmd_redis)


# -- shoal migrate -----------------------------------------------------------
def _cmd_migrate(args: argparse.Namespace) -> int:
    from migration.cli import MigrateError, migrate, render

    try:
        records = asyncio.run(migrate(
            _settings(args), args.source, args.destination, request_ids=args.request_ids,
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


def _add_migrate(sub: Subparsers) -> None:
    from migration.policies import SELECTION

    mig = sub.add_parser("migrate", help="live-migrate running requests between instances")
    mig.add_argument("--from", dest="source", required=True, help="source instance id")
    mig.add_argument("--to", dest="destination", required=True, help="destination instance id")
    which = mig.add_mutually_exclusive_group()
    which.add_argument("--request", dest="request_ids", action="append",
                       help="request id to move (repeatable)")  # fmt: skip
    which.add_argument("--count", type=int, help="move this many, chosen by --policy")
    mig.add_argument("--policy", choices=SELECTION.names(), help=SELECTION.describe())
    mig.add_argument("--mode", default="auto", choices=["auto", "kv", "recompute"])
    mig.add_argument("--json", action="store_true", help="the migration records as JSON")
    mig.add_argument("--redis-url", dest="redis_url")
    mig.set_defaults(func=_cmd_migrate)


def add_tool_commands(sub: Subparsers) -> None:
    for add in (_add_keys, _add_model, _add_status, _add_redis, _add_migrate):
        add(sub)

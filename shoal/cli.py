"""The ``shoal`` command line: one entry point, a subcommand per component.

The servers' flags are generated from their settings (``infra.flags``): every
documented setting is a ``--flag`` as it is a ``SHOAL_*`` variable. Each
component is imported only by its own subcommand, so ``shoal instance`` loads
no gateway, autoscaler or bench code."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias

from infra.cluster_auth import ClusterSecretMissing
from infra.flags import add_settings_flags, given
from infra.settings import (
    AutoscalerSettings,
    CommonSettings,
    GatewaySettings,
    InstanceSettings,
    local_cluster,
)
from infra.tls import TlsConfigError

log = logging.getLogger("shoal")

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def setup_logging(level: str) -> None:
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


# -- the servers: settings in, serve() out ------------------------------------
def _serve_instance(s: CommonSettings) -> Coroutine[Any, Any, None]:
    from instance.main import serve

    assert isinstance(s, InstanceSettings)
    return serve(s)


def _serve_gateway(s: CommonSettings) -> Coroutine[Any, Any, None]:
    from gateway.main import serve

    assert isinstance(s, GatewaySettings)
    return serve(s)


def _serve_autoscaler(s: CommonSettings) -> Coroutine[Any, Any, None]:
    from autoscaler.main import serve

    assert isinstance(s, AutoscalerSettings)
    return serve(s)


_SERVERS: dict[str, tuple[type[CommonSettings], Callable[[CommonSettings], Any], str]] = {
    "instance": (InstanceSettings, _serve_instance, "run an instance worker"),
    "gateway": (GatewaySettings, _serve_gateway, "run an OpenAI-compatible gateway replica"),
    "autoscaler": (AutoscalerSettings, _serve_autoscaler,
                   "run the autoscaler (one leads, others stand by)"),
}  # fmt: skip


_POLICY_FLAGS = {
    "dispatch_policy": ("gateway.policies", "DISPATCH"),
    "scaling_policy": ("autoscaler.policies", "SCALING"),
    "pairing_policy": ("autoscaler.policies", "PAIRING"),
}
"""Settings that name a registered policy: their flags offer the registry's
names (the settings, on the ground floor, cannot import the registries)."""


def _policy_choices(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.dest in _POLICY_FLAGS:
            module, name = _POLICY_FLAGS[action.dest]
            registry = getattr(importlib.import_module(module), name)
            action.choices = registry.names()
            action.help = registry.describe()


def _add_server(sub: Subparsers, name: str) -> None:
    settings_cls, serve, help_text = _SERVERS[name]
    parser = sub.add_parser(name, help=help_text)
    add_settings_flags(parser, settings_cls)
    _policy_choices(parser)

    def run(args: argparse.Namespace) -> int:
        settings = settings_cls(**given(args, settings_cls))
        setup_logging(settings.log_level)
        try:
            settings.cluster_keys()  # no secret, no start (unless declared open)
            settings.cluster_tls()  # nor with TLS settings that cannot work
        except (ClusterSecretMissing, TlsConfigError) as exc:
            log.error("shoal %s: %s", name, exc)
            return 2
        _run_server(serve(settings))
        return 0

    parser.set_defaults(func=run)


# -- the tools ------------------------------------------------------------------
def _cmd_up(args: argparse.Namespace) -> int:
    from shoal.up import run_up

    setup_logging("WARNING")
    return run_up(instances=args.instances, engine=args.engine, model=args.model,
                  port=args.port, base_port=args.base_port)  # fmt: skip


def _add_up(sub: Subparsers) -> None:
    up = sub.add_parser("up", help="start Redis, instances and a gateway; Ctrl-C stops all")
    up.add_argument("--instances", type=int, default=int(os.environ.get("INSTANCES", "2")))
    up.add_argument("--engine", choices=["vllm", "sim"], default=os.environ.get("ENGINE", "vllm"))
    up.add_argument("--model", default=os.environ.get("MODEL") or None)
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--base-port", type=int, default=8100, help="first instance port")
    up.set_defaults(func=_cmd_up)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or only ``command``'s when it is a server (a server's
    start-up imports nothing of the other subcommands)."""
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if command in _SERVERS:
        _add_server(sub, command)
        return parser
    from bench.cli import add_bench_commands
    from shoal.tools import add_tool_commands

    for name in _SERVERS:
        _add_server(sub, name)
    _add_up(sub)
    add_tool_commands(sub)
    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if args.command not in _SERVERS:  # a local stack's tools and benchmarks share its secret
        local_cluster(CommonSettings().run_dir)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

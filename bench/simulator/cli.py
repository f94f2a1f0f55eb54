"""``shoal bench simulate``: run a trace (a file, or generated inline with the
``shoal bench trace`` options) through the cluster simulator, print a table,
optionally write the JSON results. Also ``python -m bench.simulator``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from autoscaler.policies import PAIRING, SCALING, PairingConfig, ScalingConfig
from bench.simulator.hardware import DEFAULT_HARDWARE, HARDWARE_PRESETS, hardware_preset
from bench.traces import (
    ARRIVAL_KINDS,
    DEFAULT_ARRIVALS,
    DEFAULT_LENGTH_PRESET,
    LENGTH_PRESETS,
    ArrivalError,
    LengthSpecError,
    PriorityMix,
    Trace,
    TraceConfig,
    TraceError,
    arrival_process,
    generate_trace,
    load_trace,
    parse_lengths,
    preset_lengths,
)
from gateway.policies import DISPATCH
from migration.policies import SELECTION

if TYPE_CHECKING:
    from bench.simulator.config import SimulationConfig


def _knobs(config: type[Any], *skip: str) -> dict[str, type]:
    """A policy config's fields by name, with their types: one flag each."""
    hints = get_type_hints(config)
    return {f.name: hints[f.name] for f in fields(config) if f.name not in skip}


_SCALING_FLAGS = _knobs(ScalingConfig, "min_instances", "max_instances")
"""(``--min-instances`` and ``--max-instances`` have defaults of their own.)"""
_PAIRING_FLAGS = _knobs(PairingConfig)


def _add_trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace (a file, or generated as by `shoal bench trace`)")
    g.add_argument("--trace", type=Path, help="trace JSONL; otherwise generated from below")
    g.add_argument("--arrivals", choices=ARRIVAL_KINDS, default=DEFAULT_ARRIVALS)
    g.add_argument("--rate", type=float, help="requests per second (poisson, gamma)")
    g.add_argument("--cv", type=float, help="coefficient of variation of the gaps (gamma)")
    g.add_argument("--timestamps", type=Path, help="replay: file of arrival times")
    g.add_argument("--lengths", choices=list(LENGTH_PRESETS), default=DEFAULT_LENGTH_PRESET)
    g.add_argument("--prompt-lengths", metavar="SPEC", help="override the prompt side")
    g.add_argument("--output-lengths", metavar="SPEC", help="override the output side")
    g.add_argument("--num-requests", type=int, default=10_000)
    g.add_argument("--high-fraction", type=float, default=0.0)
    g.add_argument("--low-fraction", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0, help="seed of the trace and the simulation")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster and policies")
    g.add_argument("--instances", type=int, default=16, help="active at time 0")
    g.add_argument("--hardware", choices=sorted(HARDWARE_PRESETS), default=DEFAULT_HARDWARE)
    g.add_argument("--dispatch", choices=DISPATCH.names(), default=DISPATCH.default)
    g.add_argument("--pairing", choices=PAIRING.names(), default=PAIRING.default)
    g.add_argument("--migration", action=argparse.BooleanOptionalAction, default=True,
                   help="ask the pairing policy (--no-migration: nothing moves)")  # fmt: skip
    g.add_argument("--selection", choices=SELECTION.names(), default=SELECTION.default)
    g.add_argument("--migration-mode", choices=("auto", "kv", "recompute"), default="auto")
    g.add_argument("--scaling", choices=SCALING.names(), default="static")
    g.add_argument("--min-instances", type=int, help="default: --instances (static), 1 (band)")
    g.add_argument("--max-instances", type=int, help="default: --instances")
    for name, kind in {**_SCALING_FLAGS, **_PAIRING_FLAGS}.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, help="see ScalingConfig / "
                       "PairingConfig (default: theirs)")  # fmt: skip
    g.add_argument("--tick-s", type=float, default=0.5, help="autoscaler period")
    g.add_argument("--priorities", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-priorities: serve every request as normal priority")  # fmt: skip
    g.add_argument("--report-interval-s", type=float, default=0.0, help="0: fresh load")
    g.add_argument("--cold-start-s", type=float, help="default: the hardware preset's")


def add_simulate_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``simulate`` to the ``shoal bench`` subcommands."""
    p = sub.add_parser("simulate", help="run a trace through the cluster simulator")
    _add_trace_options(p)
    _add_cluster_options(p)
    p.add_argument("--out", type=Path, help="write the JSON results here")
    p.add_argument("--summary-only", action="store_true", help="no per-request rows in --out")
    p.set_defaults(func=cmd_simulate)


def _trace(args: argparse.Namespace) -> Trace:
    if args.trace is not None:
        return load_trace(args.trace)
    if args.rate is None and args.arrivals != "replay":
        raise ArrivalError("give --trace FILE or --rate R")
    prompt, output = preset_lengths(args.lengths)
    config = TraceConfig(
        args.num_requests,
        arrival_process(args.arrivals, rate=args.rate, cv=args.cv, timestamps=args.timestamps),
        parse_lengths(args.prompt_lengths) if args.prompt_lengths else prompt,
        parse_lengths(args.output_lengths) if args.output_lengths else output,
        PriorityMix(args.high_fraction, args.low_fraction),
        seed=args.seed,
        lengths_preset=args.lengths,
    )
    return generate_trace(config)


def _given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    from bench.simulator.config import SimulationConfig

    static = args.scaling == "static"
    max_instances = args.max_instances or max(args.instances, 1)
    min_default = args.instances if static else min(1, args.instances)
    min_instances = min_default if args.min_instances is None else args.min_instances
    return SimulationConfig(
        num_instances=args.instances, dispatch=args.dispatch, scaling=args.scaling,
        scaling_config=ScalingConfig(min_instances=min_instances, max_instances=max_instances,
                                     **_given(args, _SCALING_FLAGS)),
        pairing=args.pairing, pairing_config=PairingConfig(**_given(args, _PAIRING_FLAGS)),
        migration=args.migration, selection=args.selection, migration_mode=args.migration_mode,
        tick_s=args.tick_s, report_interval_s=args.report_interval_s, priorities=args.priorities,
        hardware=hardware_preset(args.hardware), cold_start_s=args.cold_start_s, seed=args.seed,
    )  # fmt: skip


def cmd_simulate(args: argparse.Namespace) -> int:
    from bench.simulator import simulate

    try:
        trace = _trace(args)
        config = config_from_args(args)
    except (ArrivalError, LengthSpecError, TraceError, ValueError, OSError) as exc:
        print(f"shoal bench simulate: {exc}", file=sys.stderr)
        return 1
    result = simulate(trace.requests, config)
    print(result.render())
    print(f"simulated {result.summary['duration_s']:.1f} s in {result.wall_s:.1f} s "
          f"({result.num_events} events)")  # fmt: skip
    if args.out is not None:
        out = result.to_json(with_requests=not args.summary_only)
        out["trace_header"] = None if trace.header is None else trace.header.__dict__
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_command(sub)
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))

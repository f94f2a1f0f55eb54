"""``shoal bench soak`` (also ``python -m bench.soak``): arguments only. The
soak itself (aiohttp, the cluster, matplotlib) is imported when the command
runs, not at ``shoal`` start-up."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

MODES = ("kv", "recompute")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated: {text!r}")
    return values


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        bounds = int(lo), int(hi)
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
    return bounds


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(text.split(","))
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return modes


def add_soak_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``soak`` to the ``shoal bench`` subcommands."""
    p = sub.add_parser("soak", help="soak the whole stack: migrations, kills, drains; "
                       "every output checked (docs/RELIABILITY.md)")  # fmt: skip
    add_soak_arguments(p)
    p.set_defaults(func=cmd_soak)


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--engine", choices=("vllm", "sim"), default="vllm",
                   help="vllm (one engine per core) or sim (a fast dry run)")  # fmt: skip
    g.add_argument("--instances", type=int, default=2)
    g.add_argument("--max-num-seqs", type=int, default=4, help="batch of each instance")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--block-size", type=int,
                   help="tokens per KV block (default: 32 for vllm, as the migration tests "
                   "use, so KV migrations move several blocks; the sim engine's own)")  # fmt: skip
    g.add_argument("--kv-cache-bytes", type=int, help="vLLM KV cache (default: the instance's)")
    g.add_argument("--sim-speedup", type=float, default=1.0, help="sim engine speed factor")

    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int,
                   help="streams in flight (default: twice the instances' batches)")  # fmt: skip
    g.add_argument("--prompts", type=int, default=128, help="distinct prompts (references)")
    g.add_argument("--prompt-lengths", type=_range, default=(16, 200), metavar="LO:HI",
                   help="prompt tokens (text: characters) (default 16:200)")  # fmt: skip
    g.add_argument("--max-tokens", type=_ints, default=(128, 256), metavar="N[,N...]",
                   help="output lengths, cycled over the prompts (default 128,256)")  # fmt: skip
    g.add_argument("--stream-timeout-s", type=float, default=120.0,
                   help="silence after which a stream counts as lost")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("phases (a target of 0 skips the phase)")
    g.add_argument("--migrations", type=int, default=1000, help="target migrations run")
    g.add_argument("--onto-queue-share", type=float, default=1 / 3,
                   help="target share of migrations onto a destination with a queue")  # fmt: skip
    g.add_argument("--migrators", type=int, default=2, help="concurrent migration loops")
    g.add_argument("--modes", type=_modes, default=MODES, help="kv,recompute")
    g.add_argument("--queued-share", type=float, default=0.5,
                   help="chance of moving a queued request when both kinds are there")  # fmt: skip
    g.add_argument("--kills", type=int, default=20, help="target SIGKILLed instances")
    g.add_argument("--kill-interval-s", type=float, default=10.0,
                   help="at least this long between kills (default 10)")  # fmt: skip
    g.add_argument("--drains", type=int, default=100, help="target drain cycles")
    g.add_argument("--full-drain-every", type=int, default=10,
                   help="every Nth drain: the autoscaler stops it (0: never)")  # fmt: skip
    g.add_argument("--drain-timeout-s", type=float, default=120.0)

    g = p.add_argument_group("time bounds (seconds)")
    for phase, default in (("migrations", 1800.0), ("kills", 2400.0), ("drains", 2400.0)):
        g.add_argument(f"--{phase}-time-s", type=float, default=default,
                       help=f"budget of the {phase} phase (default {default:.0f})")  # fmt: skip
    g.add_argument("--max-duration-s", type=float, default=7200.0,
                   help="no new phase or action past this")  # fmt: skip
    g.add_argument("--settle-timeout-s", type=float, default=90.0,
                   help="wait for instances to release everything at the end")  # fmt: skip

    g = p.add_argument_group("checks and output")
    g.add_argument("--compare", choices=("exact", "usage"), default="exact",
                   help="exact: text, usage, finish (default); usage: no text")  # fmt: skip
    g.add_argument("--reference-check", type=int, default=8,
                   help="prompts whose reference is computed on a 2nd instance too")  # fmt: skip
    g.add_argument("--out", type=Path, help="directory (default bench/out/soak/<time>-<engine>)")
    g.add_argument("--log-level", default="INFO")


def cmd_soak(args: argparse.Namespace) -> int:
    from bench.soak.accounting import Targets
    from bench.soak.drive import DriveConfig
    from bench.soak.run import SoakConfig, run_soak

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.instances < 2:
        print("shoal bench soak: needs --instances >= 2 (migrations need a destination)",
              file=sys.stderr)  # fmt: skip
        return 1
    drive = DriveConfig(
        concurrency=args.concurrency or 2 * args.instances * args.max_num_seqs,
        migrators=args.migrators, modes=args.modes, queued_share=args.queued_share,
        stream_timeout_s=args.stream_timeout_s, kill_interval_s=args.kill_interval_s,
        drain_timeout_s=args.drain_timeout_s,
        full_drain_every=args.full_drain_every, settle_timeout_s=args.settle_timeout_s,
        reference_check=args.reference_check, seed=args.seed,
    )  # fmt: skip
    config = SoakConfig(
        engine=args.engine, instances=args.instances, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, prompts=args.prompts,
        prompt_lengths=args.prompt_lengths, max_tokens=args.max_tokens,
        targets=Targets(args.migrations, args.onto_queue_share, args.kills, args.drains),
        drive=drive, max_duration_s=args.max_duration_s, compare=args.compare,
        phase_time_s={"migrations": args.migrations_time_s, "kills": args.kills_time_s,
                      "drains": args.drains_time_s},
        sim_speedup=args.sim_speedup,
        block_size=args.block_size or (32 if args.engine == "vllm" else None),
        kv_cache_bytes=args.kv_cache_bytes, out=args.out,
    )  # fmt: skip
    return run_soak(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    add_soak_arguments(parser)
    return cmd_soak(parser.parse_args(argv))

"""``shoal bench``: generate traces (``trace``) and replay them against an
OpenAI-compatible server (``run``). See docs/BENCH_TOOLS.md."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from bench.simulator.cli import add_simulate_command
from bench.soak.cli import add_soak_command
from bench.traces import (
    ARRIVAL_KINDS,
    DEFAULT_ARRIVALS,
    DEFAULT_LENGTH_PRESET,
    LENGTH_PRESETS,
    SOURCES,
    ArrivalError,
    ConvertOptions,
    LengthSpecError,
    PriorityMix,
    Replay,
    Trace,
    TraceConfig,
    TraceError,
    arrival_process,
    convert,
    generate_trace,
    load_trace,
    parse_lengths,
    preset_lengths,
    render_stats,
    save_trace,
    trace_stats,
)

USER_ERRORS = (ArrivalError, LengthSpecError, TraceError, OSError)
PROMPT_MODES = ("token-ids", "text")
"""``bench.loadgen.PROMPT_MODES``, repeated so ``shoal`` starts without importing aiohttp."""


def _trace_config(args: argparse.Namespace) -> TraceConfig:
    arrivals = arrival_process(
        args.arrivals, rate=args.rate, cv=args.cv, timestamps=args.timestamps
    )
    prompt, output = preset_lengths(args.lengths)
    if args.prompt_lengths:
        prompt = parse_lengths(args.prompt_lengths)
    if args.output_lengths:
        output = parse_lengths(args.output_lengths)
    overridden = args.prompt_lengths or args.output_lengths
    num = args.num_requests
    if num is None:
        num = len(arrivals.timestamps) if isinstance(arrivals, Replay) else 1000
    return TraceConfig(
        num_requests=num,
        arrivals=arrivals,
        prompt_lengths=prompt,
        output_lengths=output,
        priorities=PriorityMix(args.high_fraction, args.low_fraction),
        seed=args.seed,
        max_total_tokens=args.max_total_tokens,
        lengths_preset=None if overridden else args.lengths,
    )


def _convert(args: argparse.Namespace) -> Trace:
    options = ConvertOptions(
        start_s=args.start,
        duration_s=args.duration,
        speedup=args.speedup,
        rate_scale=args.rate_scale,
        target_rate=args.target_rate,
        length_scale=args.length_scale,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        max_total_tokens=args.max_total_tokens,
        priorities=PriorityMix(args.high_fraction, args.low_fraction),
        seed=args.seed,
    )
    return convert(args.source, options)


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        trace = _convert(args)
        if args.out is not None:
            save_trace(trace, args.out)
    except USER_ERRORS as exc:
        print(f"shoal bench trace: {exc}", file=sys.stderr)
        return 1
    assert trace.header is not None and trace.header.source is not None
    print(f"from {trace.header.source['attribution']}")
    print(f"rate scale {trace.header.arrivals['rate_scale']:.4g}, seed {args.seed}")
    print(render_stats(trace_stats(trace.requests)))
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    if args.source is not None:
        return _cmd_convert(args)
    try:
        config = _trace_config(args)
        trace = generate_trace(config)
        if args.out is not None:
            save_trace(trace, args.out)
    except USER_ERRORS as exc:
        print(f"shoal bench trace: {exc}", file=sys.stderr)
        return 1
    print(f"arrivals {config.arrivals.params()}, seed {config.seed}")
    print(f"prompt lengths {config.prompt_lengths.spec}")
    print(f"output lengths {config.output_lengths.spec}")
    print(render_stats(trace_stats(trace.requests), config))
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _token_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        bounds = int(lo), int(hi)
    except ValueError:
        bounds = (0, 0)
    if not sep or not 0 <= bounds[0] < bounds[1]:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 0 <= LO < HI, got {text!r}")
    return bounds


def _cmd_run(args: argparse.Namespace) -> int:
    from bench.loadgen import LoadGenConfig, LoadGenError, render_summary, run_trace, write_results

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = LoadGenConfig(
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        prompt_mode=args.prompt_mode,
        token_id_range=args.token_id_range,
        time_scale=args.time_scale,
        request_timeout_s=args.request_timeout,
        status_redis=args.status_redis,
        namespace=args.namespace,
        sample_interval_s=args.sample_interval,
        progress=not args.no_progress,
        seed=args.seed,
    )
    try:
        trace = load_trace(args.trace)
        run = asyncio.run(run_trace(trace, config))
    except (*USER_ERRORS, LoadGenError) as exc:
        print(f"shoal bench run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shoal bench run: interrupted", file=sys.stderr)
        return 130
    print(render_summary(run.summary()))
    if args.out is not None:
        for path in write_results(run, args.out):
            print(f"wrote {path}")
    return 0


def _add_trace(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("trace", help="generate a seeded trace (JSONL) and print its statistics")
    p.add_argument("--arrivals", choices=ARRIVAL_KINDS, default=DEFAULT_ARRIVALS)
    p.add_argument("--rate", type=float, help="requests per second (poisson, gamma)")
    p.add_argument("--cv", type=float, help="coefficient of variation of the gaps (gamma)")
    p.add_argument("--timestamps", type=Path, help="replay: file of arrival times, one a line")
    p.add_argument(
        "--lengths",
        choices=list(LENGTH_PRESETS),
        default=DEFAULT_LENGTH_PRESET,
        help=f"prompt-output length preset (default {DEFAULT_LENGTH_PRESET})",
    )
    p.add_argument(
        "--prompt-lengths",
        metavar="SPEC",
        help="override the prompt side: fixed:N, uniform:lo=A,hi=B, zipf:mean=M, "
        "zipf:alpha=A, lognormal:mu=U,sigma=S, S|M|L, sharegpt-prompt, ...",
    )
    p.add_argument("--output-lengths", metavar="SPEC", help="override the output side (as above)")
    p.add_argument("--num-requests", type=int, help="default 1000 (replay: every timestamp)")
    p.add_argument("--high-fraction", type=float, default=0.0, help="share of high priority")
    p.add_argument("--low-fraction", type=float, default=0.0, help="share of low priority")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-total-tokens",
        type=int,
        help="redraw lengths until prompt + output fit (a model's context)",
    )
    p.add_argument("--out", type=Path, help="write the trace here (JSONL)")
    real = p.add_argument_group(
        "real traces", "convert a shipped production trace (bench/traces/data/NOTICE) instead "
        "of generating one; --arrivals, --rate, --lengths and --num-requests do not apply"
    )  # fmt: skip
    real.add_argument("--from", dest="source", choices=list(SOURCES), help="the source trace")
    real.add_argument("--start", type=float, default=0.0, help="skip the first source seconds")
    real.add_argument("--duration", type=float, help="keep this many source seconds")
    real.add_argument("--speedup", type=float, default=1.0, help="compress time (10: 10x faster)")
    real.add_argument("--rate-scale", type=float, help="thin (< 1) or replicate (> 1), seeded")
    real.add_argument("--target-rate", type=float, help="or: scale to this mean req/s")
    real.add_argument("--length-scale", type=float, default=1.0, help="multiply every length")
    real.add_argument("--max-prompt-tokens", type=int, help="cap prompt lengths")
    real.add_argument("--max-output-tokens", type=int, help="cap output lengths")
    p.set_defaults(func=_cmd_trace)


def _add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="replay a trace against an OpenAI-compatible server")
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--trace", type=Path, required=True, help="trace JSONL (shoal bench trace)")
    p.add_argument("--out", type=Path, help="directory for results.json and plots")
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply arrival times (0.1 = ten times faster)",
    )
    p.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        default=PROMPT_MODES[0],
        help="token-ids (exact on any server that takes token-id prompts) or text "
        "(one character per token: exact for Shoal's sim engine)",
    )
    p.add_argument(
        "--token-id-range",
        type=_token_range,
        default=(10, 256),
        metavar="LO:HI",
        help="prompt token ids are drawn from [LO, HI) (default 10:256)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the next byte of a response",
    )
    p.add_argument("--status-redis", metavar="URL", help="Shoal's Redis: record instance counts")
    p.add_argument("--namespace", default="shoal", help="Shoal namespace in that Redis")
    p.add_argument("--sample-interval", type=float, default=0.5, help="timeline period (s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt contents")
    p.set_defaults(func=_cmd_run)


def add_bench_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bench trace`` and ``bench run`` to the ``shoal`` parser."""
    bench = sub.add_parser("bench", help="benchmark traces and the load generator")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_trace(bench_sub)
    _add_run(bench_sub)
    add_simulate_command(bench_sub)
    add_soak_command(bench_sub)

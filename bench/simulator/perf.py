"""How fast the simulator runs: the issue's target is 10,000 requests on 16
instances in under a minute on one core. Prints the timing; asserts nothing.

    .venv/bin/python -m bench.simulator.perf                 # M-M Poisson, 12 req/s
    .venv/bin/python -m bench.simulator.perf --rate 20 --dispatch round-robin
"""

from __future__ import annotations

import argparse
import time

from bench.simulator import simulate
from bench.simulator.config import SimulationConfig
from bench.traces import Poisson, TraceConfig, generate_trace, preset_lengths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simulator.perf", description=__doc__)
    p.add_argument("--num-requests", type=int, default=10_000)
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--rate", type=float, default=12.0, help="near saturation for 16 x M-M")
    p.add_argument("--lengths", default="M-M")
    p.add_argument("--dispatch", default="llumnix")
    p.add_argument("--no-migration", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    trace = generate_trace(TraceConfig(args.num_requests, Poisson(args.rate),
                                       *preset_lengths(args.lengths), seed=0))  # fmt: skip
    t1 = time.perf_counter()
    config = SimulationConfig(num_instances=args.instances, dispatch=args.dispatch,
                              migration=not args.no_migration)  # fmt: skip
    result = simulate(trace.requests, config)
    t2 = time.perf_counter()
    s = result.summary
    print(f"{args.num_requests} requests ({args.lengths}, Poisson {args.rate:g}/s) on "
          f"{args.instances} instances, {args.dispatch}"
          f"{'' if args.no_migration else ' + migration'}")  # fmt: skip
    print(f"simulated {s['duration_s']:.0f} s in {t2 - t1:.1f} s wall "
          f"({result.num_events} events, {result.num_events / (t2 - t1):,.0f}/s; "
          f"trace generated in {t1 - t0:.1f} s)")  # fmt: skip
    print(f"{s['output_tokens']} output tokens, {s['num_ok']} ok, {s['num_errors']} errors; "
          f"{s['simulation']['migration']['num_migrated']} migrations, "
          f"{s['simulation']['preemption']['num_preemptions']} preemptions")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Seeded request traces for benchmarks and the cluster simulator.

A trace is a list of ``TraceRequest`` (arrival time, prompt and output token
counts, priority) drawn from an arrival process (``Poisson``, ``Gamma``,
``Replay``), two length distributions (``fixed``, ``uniform``, ``zipf``,
``lognormal`` or a named preset: the Llumnix S/M/L Zipf sets, ShareGPT- and
BurstGPT-like fits) and a ``PriorityMix``. The same ``TraceConfig`` always
gives the same trace; ``save_trace`` writes JSONL with a header line.
``convert`` turns a shipped production trace (Azure 2023, Mooncake; see
``bench/traces/data/NOTICE``) into one.

    config = TraceConfig(1000, Poisson(5.0), *preset_lengths("M-M"),
                         PriorityMix(high=0.1), seed=0)
    save_trace(generate_trace(config), Path("trace.jsonl"))

See docs/BENCH_TOOLS.md for the distributions and fitted parameters.
"""

from __future__ import annotations

from bench.traces.arrivals import (
    ARRIVAL_KINDS,
    DEFAULT_ARRIVALS,
    ArrivalError,
    ArrivalProcess,
    Gamma,
    Poisson,
    Replay,
    arrival_process,
)
from bench.traces.lengths import (
    LengthDistribution,
    LengthSpecError,
    fixed,
    llumnix_zipf,
    lognormal,
    parse_lengths,
    solve_zipf_alpha,
    uniform,
    zipf,
)
from bench.traces.presets import (
    DEFAULT_LENGTH_PRESET,
    LENGTH_PRESETS,
    LengthPreset,
    preset_lengths,
)
from bench.traces.real import SOURCES, ConvertOptions, RawRequest, convert, read_source
from bench.traces.stats import LengthStats, TraceStats, percentile, render_stats, trace_stats
from bench.traces.trace import (
    PriorityMix,
    Trace,
    TraceConfig,
    TraceError,
    TraceHeader,
    TraceRequest,
    generate_trace,
    load_trace,
    save_trace,
)

__all__ = [
    "ARRIVAL_KINDS",
    "DEFAULT_ARRIVALS",
    "DEFAULT_LENGTH_PRESET",
    "LENGTH_PRESETS",
    "SOURCES",
    "ArrivalError",
    "ArrivalProcess",
    "ConvertOptions",
    "Gamma",
    "LengthDistribution",
    "LengthPreset",
    "LengthSpecError",
    "LengthStats",
    "Poisson",
    "PriorityMix",
    "RawRequest",
    "Replay",
    "Trace",
    "TraceConfig",
    "TraceError",
    "TraceHeader",
    "TraceRequest",
    "TraceStats",
    "arrival_process",
    "convert",
    "fixed",
    "generate_trace",
    "llumnix_zipf",
    "load_trace",
    "lognormal",
    "parse_lengths",
    "percentile",
    "preset_lengths",
    "read_source",
    "render_stats",
    "save_trace",
    "solve_zipf_alpha",
    "trace_stats",
    "uniform",
    "zipf",
]

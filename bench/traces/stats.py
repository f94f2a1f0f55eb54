"""Realised statistics of a trace, beside the ones its generator asked for."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.traces.lengths import LengthDistribution
from bench.traces.trace import TraceConfig, TraceRequest
from infra.records import Priority


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation between order
    statistics (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class LengthStats:
    mean: float
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[int]) -> LengthStats:
        return cls(
            statistics.fmean(values), percentile(values, 0.5), percentile(values, 0.99), max(values)
        )

    @classmethod
    def expected(cls, dist: LengthDistribution) -> LengthStats:
        return cls(dist.mean(), dist.quantile(0.5), dist.quantile(0.99), dist.hi)


@dataclass(frozen=True)
class TraceStats:
    num_requests: int
    duration_s: float
    """First to last arrival."""
    rate: float | None
    """Gaps per second of span: (n - 1) / duration; None for one request."""
    interarrival_cv: float | None
    prompt: LengthStats
    output: LengthStats
    priority_fractions: dict[Priority, float]


def trace_stats(requests: Sequence[TraceRequest]) -> TraceStats:
    times = sorted(r.arrival_s for r in requests)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    duration = times[-1] - times[0]
    mean_gap = statistics.fmean(gaps) if gaps else 0.0
    cv = statistics.pstdev(gaps) / mean_gap if mean_gap > 0 else None
    n = len(requests)
    return TraceStats(
        num_requests=n,
        duration_s=duration,
        rate=(n - 1) / duration if duration > 0 else None,
        interarrival_cv=cv,
        prompt=LengthStats.of([r.prompt_tokens for r in requests]),
        output=LengthStats.of([r.output_tokens for r in requests]),
        priority_fractions={p: sum(r.priority == p for r in requests) / n for p in Priority},
    )


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def render_stats(stats: TraceStats, config: TraceConfig | None = None) -> str:
    """A table of realised statistics, with the requested ones when known."""
    arrivals = None if config is None else config.arrivals
    rows: list[tuple[str, float | None, float | None, int]] = [
        ("arrival rate (req/s)", arrivals.expected_rate if arrivals else None, stats.rate, 3),
        ("inter-arrival CV", arrivals.expected_cv if arrivals else None, stats.interarrival_cv, 3),
    ]
    for side, realised in (("prompt", stats.prompt), ("output", stats.output)):
        dist = None if config is None else getattr(config, f"{side}_lengths")
        want = None if dist is None else LengthStats.expected(dist)
        for name in ("mean", "p50", "p99", "max"):
            wanted = None if want is None else getattr(want, name)
            rows.append((f"{side} tokens {name}", wanted, getattr(realised, name), 1))
    for prio in Priority:
        asked = None
        if config is not None:
            mix = config.priorities
            asked = {Priority.HIGH: mix.high, Priority.LOW: mix.low}.get(
                prio, 1 - mix.high - mix.low
            )
        rows.append(
            (
                f"{prio.value} priority (%)",
                None if asked is None else 100 * asked,
                100 * stats.priority_fractions[prio],
                1,
            )
        )
    lines = [
        f"{stats.num_requests} requests over {stats.duration_s:.1f} s",
        f"{'':24} {'requested':>10} {'realised':>10}",
    ]
    lines += [f"{name:24} {_fmt(want, d):>10} {_fmt(got, d):>10}" for name, want, got, d in rows]
    return "\n".join(lines)

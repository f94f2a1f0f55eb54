"""Traffic and latency as the ``slo`` scaling policy sees them: arrivals,
requested tokens and per-priority TTFT/TPOT over a recent window.

``TrafficLog`` is the bounded, windowed record one observer keeps (the
simulator of its own requests; a gateway of the requests it dispatched) and
``summary`` reduces it to a ``Traffic``. Times are passed in (any clock), so
the log is pure and shared by the live system and the simulator.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.records import Priority

DEFAULT_WINDOW_S = 30.0
"""Window of the latency percentiles."""
DEFAULT_RATE_WINDOW_S = 5.0
"""Window of the rates: short, so a forecast of them lags little."""
DEFAULT_MAX_SAMPLES = 50_000
"""Samples kept per series: a window at more than this many requests per
window keeps only the newest (the rates then undercount, which the summary
states through ``truncated``)."""


def p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Latency:
    """One priority's latency over the window."""

    num_first_tokens: int = 0
    ttft_p99_s: float | None = None
    num_finished: int = 0
    tpot_p99_s: float | None = None
    """Time per output token after the first (finished requests)."""


@dataclass(frozen=True)
class Traffic:
    window_s: float
    """Span of the latency percentiles (shorter while the log is younger)."""
    rate_window_s: float
    """Span of the rates (always the whole window: a log younger than it
    undercounts its first seconds instead of dividing by almost nothing)."""
    arrival_rate: float
    """Requests per second over the rate window."""
    token_rate: float
    """Prompt plus output tokens per second of the requests that finished
    over the rate window (exact: from their usage)."""
    latency: Mapping[Priority, Latency] = field(default_factory=dict)
    truncated: bool = False
    """Some series outgrew its bound within the window."""

    def of(self, priority: Priority) -> Latency:
        return self.latency.get(priority, Latency())


@dataclass
class TrafficBatch:
    """What one observer saw since its last flush: the unit gateways publish
    (``TrafficBoard``) and a log merges at the batch's time."""

    arrivals: int = 0
    tokens: int = 0
    """Prompt plus output tokens of the requests that finished."""
    ttft: dict[Priority, list[float]] = field(default_factory=dict)
    tpot: dict[Priority, list[float]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.arrivals or self.tokens or self.ttft or self.tpot)

    def to_json(self) -> dict[str, Any]:
        return {
            "arrivals": self.arrivals,
            "tokens": self.tokens,
            "ttft": {p.value: v for p, v in self.ttft.items()},
            "tpot": {p.value: v for p, v in self.tpot.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrafficBatch:
        def samples(key: str) -> dict[Priority, list[float]]:
            return {Priority(p): [float(x) for x in v] for p, v in data.get(key, {}).items()}

        return cls(int(data.get("arrivals", 0)), int(data.get("tokens", 0)),
                   samples("ttft"), samples("tpot"))  # fmt: skip


class TrafficLog:
    """Arrivals and served tokens (kept for ``rate_window_s``), first tokens
    and finishes (kept for ``window_s``), with their times; at most
    ``max_samples`` entries of each."""

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> None:
        if window_s <= 0 or rate_window_s <= 0 or max_samples < 1:
            raise ValueError("windows must be > 0 and max_samples >= 1")
        self.window_s, self.rate_window_s = window_s, rate_window_s
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=max_samples)
        self._tokens: deque[tuple[float, int]] = deque(maxlen=max_samples)
        self._ttft: deque[tuple[float, Priority, float]] = deque(maxlen=max_samples)
        self._tpot: deque[tuple[float, Priority, float]] = deque(maxlen=max_samples)
        self._started_at: float | None = None

    def arrived(self, now: float, count: int = 1) -> None:
        self._first(now)
        self._arrivals.append((now, count))

    def served(self, now: float, tokens: int) -> None:
        """A request finished with ``tokens`` prompt plus output tokens."""
        self._first(now)
        self._tokens.append((now, tokens))

    def first_token(self, now: float, priority: Priority, ttft_s: float) -> None:
        self._first(now)
        self._ttft.append((now, priority, ttft_s))

    def finished(self, now: float, priority: Priority, tpot_s: float) -> None:
        self._first(now)
        self._tpot.append((now, priority, tpot_s))

    def add(self, now: float, batch: TrafficBatch) -> None:
        """Everything ``batch`` holds, as seen at ``now``."""
        if batch.arrivals:
            self.arrived(now, batch.arrivals)
        if batch.tokens:
            self.served(now, batch.tokens)
        for prio, values in batch.ttft.items():
            for v in values:
                self.first_token(now, prio, v)
        for prio, values in batch.tpot.items():
            for v in values:
                self.finished(now, prio, v)

    def _first(self, now: float) -> None:
        if self._started_at is None:
            self._started_at = now

    def summary(self, now: float) -> Traffic:
        """The windows ending ``now`` (shorter while the log is younger)."""
        _drop_before(self._arrivals, now - self.rate_window_s)
        _drop_before(self._tokens, now - self.rate_window_s)
        _drop_before(self._ttft, now - self.window_s)
        _drop_before(self._tpot, now - self.window_s)
        age = math.inf if self._started_at is None else now - self._started_at
        span = max(min(self.window_s, age), 1e-9)
        rate_span = self.rate_window_s  # a younger log undercounts rather than spikes
        latency = {
            prio: Latency(
                len(ttft := [v for _, p, v in self._ttft if p is prio]), p99(ttft),
                len(tpot := [v for _, p, v in self._tpot if p is prio]), p99(tpot),
            )
            for prio in Priority
        }  # fmt: skip
        series = (self._arrivals, self._tokens, self._ttft, self._tpot)
        full = any(len(s) == s.maxlen for s in series)
        return Traffic(
            window_s=span,
            rate_window_s=rate_span,
            arrival_rate=sum(count for _, count in self._arrivals) / rate_span,
            token_rate=sum(tokens for _, tokens in self._tokens) / rate_span,
            latency=latency,
            truncated=full,
        )


def _drop_before(series: deque[Any], since: float) -> None:
    while series and series[0][0] < since:
        series.popleft()

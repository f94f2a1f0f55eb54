"""Traces: seeded lists of requests (arrival time, prompt and output lengths,
priority), saved as JSONL with a header line recording how they were made.

Each part of a trace draws from its own random stream, derived from the seed
and the part's name, so changing one knob (say the priority mix) leaves the
arrival times and lengths of the same seed unchanged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.traces.arrivals import ArrivalProcess, Gamma, Poisson, Replay
from bench.traces.lengths import LengthDistribution, parse_lengths
from infra.records import Priority

TRACE_FORMAT = "shoal-trace"
TRACE_VERSION = 1
MAX_RESAMPLES = 1000
"""Draws per request before ``max_total_tokens`` is declared unreachable."""


class TraceError(ValueError):
    """A trace that cannot be generated or read."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    arrival_s: float
    """Seconds after the start of the trace."""
    prompt_tokens: int
    output_tokens: int
    priority: Priority = Priority.NORMAL

    def to_json(self) -> dict[str, Any]:
        return {
            "arrival_s": self.arrival_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "priority": self.priority.value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TraceRequest:
        try:
            req = cls(
                float(data["arrival_s"]),
                int(data["prompt_tokens"]),
                int(data["output_tokens"]),
                Priority(data.get("priority", "normal")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise TraceError(f"bad trace request {data!r}: {exc}") from None
        if req.arrival_s < 0 or req.prompt_tokens < 1 or req.output_tokens < 1:
            raise TraceError(f"bad trace request {data!r}: negative time or empty lengths")
        return req


@dataclass(frozen=True)
class PriorityMix:
    """Fractions of high- and low-priority requests; the rest are normal.
    Counts are exact (rounded), positions random."""

    high: float = 0.0
    low: float = 0.0

    def __post_init__(self) -> None:
        if self.high < 0 or self.low < 0 or self.high + self.low > 1:
            raise TraceError(
                f"priority fractions must be >= 0 and sum to <= 1 "
                f"(high={self.high}, low={self.low})"
            )

    def assign(self, rng: random.Random, n: int) -> list[Priority]:
        num_high, num_low = round(self.high * n), round(self.low * n)
        num_low = min(num_low, n - num_high)
        out = [Priority.HIGH] * num_high + [Priority.LOW] * num_low
        out += [Priority.NORMAL] * (n - len(out))
        rng.shuffle(out)
        return out


@dataclass(frozen=True)
class TraceHeader:
    """The first JSONL line: everything needed to generate the trace again."""

    seed: int
    num_requests: int
    arrivals: dict[str, Any]
    prompt_lengths: str
    output_lengths: str
    high_fraction: float = 0.0
    low_fraction: float = 0.0
    lengths_preset: str | None = None
    max_total_tokens: int | None = None
    source: dict[str, Any] | None = None
    """A converted real trace: its source, attribution and conversion options
    (``bench.traces.real``); None for a generated trace."""
    format: str = TRACE_FORMAT
    version: int = TRACE_VERSION


@dataclass(frozen=True)
class TraceConfig:
    """What to generate."""

    num_requests: int
    arrivals: ArrivalProcess
    prompt_lengths: LengthDistribution
    output_lengths: LengthDistribution
    priorities: PriorityMix = field(default_factory=PriorityMix)
    seed: int = 0
    max_total_tokens: int | None = None
    """Redraw a request's lengths until prompt + output fit (a model's context)."""
    lengths_preset: str | None = None
    """Name of the preset the lengths came from (for the header only)."""

    def header(self) -> TraceHeader:
        return TraceHeader(
            seed=self.seed,
            num_requests=self.num_requests,
            arrivals=self.arrivals.params(),
            prompt_lengths=self.prompt_lengths.spec,
            output_lengths=self.output_lengths.spec,
            high_fraction=self.priorities.high,
            low_fraction=self.priorities.low,
            lengths_preset=self.lengths_preset,
            max_total_tokens=self.max_total_tokens,
        )

    @classmethod
    def from_header(cls, header: TraceHeader, replay: Replay | None = None) -> TraceConfig:
        """The config a header records (a replay's timestamps are passed in)."""
        kind = header.arrivals.get("kind")
        arrivals: ArrivalProcess
        if kind == "poisson":
            arrivals = Poisson(header.arrivals["rate"])
        elif kind == "gamma":
            arrivals = Gamma(header.arrivals["rate"], header.arrivals["cv"])
        elif kind == "replay" and replay is not None:
            arrivals = replay
        else:
            raise TraceError(f"cannot rebuild arrivals {header.arrivals!r}")
        return cls(
            header.num_requests,
            arrivals,
            parse_lengths(header.prompt_lengths),
            parse_lengths(header.output_lengths),
            PriorityMix(header.high_fraction, header.low_fraction),
            header.seed,
            header.max_total_tokens,
            header.lengths_preset,
        )


@dataclass(frozen=True)
class Trace:
    header: TraceHeader | None
    """None for a JSONL file written by hand, without a header line."""
    requests: tuple[TraceRequest, ...]


def _stream(seed: int, part: str) -> random.Random:
    return random.Random(f"{TRACE_FORMAT}:{seed}:{part}")


def _fit_context(config: TraceConfig, prompts: list[int], outputs: list[int]) -> None:
    limit = config.max_total_tokens
    if limit is None:
        return
    if config.prompt_lengths.lo + config.output_lengths.lo > limit:
        raise TraceError(f"max_total_tokens={limit} is below the shortest prompt + output")
    rng = _stream(config.seed, "redraw")
    for i in range(len(prompts)):
        for _ in range(MAX_RESAMPLES):
            if prompts[i] + outputs[i] <= limit:
                break
            prompts[i] = config.prompt_lengths.sample(rng, 1)[0]
            outputs[i] = config.output_lengths.sample(rng, 1)[0]
        else:
            raise TraceError(
                f"no prompt + output within max_total_tokens={limit} after {MAX_RESAMPLES} draws"
            )


def generate_trace(config: TraceConfig) -> Trace:
    """The trace ``config`` describes; the same config gives the same trace."""
    n, seed = config.num_requests, config.seed
    if n < 1:
        raise TraceError(f"num_requests must be >= 1 (got {n})")
    times = config.arrivals.times(_stream(seed, "arrivals"), n)
    prompts = config.prompt_lengths.sample(_stream(seed, "prompt"), n)
    outputs = config.output_lengths.sample(_stream(seed, "output"), n)
    _fit_context(config, prompts, outputs)
    priorities = config.priorities.assign(_stream(seed, "priority"), n)
    requests = tuple(
        TraceRequest(round(t, 6), p, o, prio)
        for t, p, o, prio in zip(times, prompts, outputs, priorities, strict=True)
    )
    return Trace(config.header(), requests)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def save_trace(trace: Trace, path: Path) -> None:
    """Write the header line (if any), then one line per request."""
    lines: Iterable[str] = (_dumps(r.to_json()) for r in trace.requests)
    if trace.header is not None:
        header = trace.header
        lines = [
            _dumps({"format": header.format, "version": header.version, **asdict(header)}),
            *lines,
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _header(data: dict[str, Any]) -> TraceHeader:
    if data.get("version") != TRACE_VERSION:
        raise TraceError(f"trace version {data.get('version')!r} (this reader: {TRACE_VERSION})")
    try:
        return TraceHeader(**data)
    except TypeError as exc:
        raise TraceError(f"bad trace header: {exc}") from None


def load_trace(path: Path) -> Trace:
    """Read a trace written by ``save_trace`` (or a header-less JSONL of requests)."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{number}: {exc}") from None
    header = _header(rows.pop(0)) if rows and rows[0].get("format") == TRACE_FORMAT else None
    requests = tuple(TraceRequest.from_json(row) for row in rows)
    if not requests:
        raise TraceError(f"{path}: no requests")
    return Trace(header, requests)


def arrival_order(requests: Sequence[TraceRequest]) -> list[int]:
    """Indices of ``requests`` by arrival time (stable for ties)."""
    return sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)

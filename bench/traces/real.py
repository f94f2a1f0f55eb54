"""Real production traces, converted into Shoal traces.

Shipped in ``bench/traces/data`` with their attribution (``NOTICE``):

- ``azure-conv``, ``azure-code``: the Azure LLM inference traces 2023
  (conversation and code services, about an hour each; CC BY 4.0);
- ``mooncake-conversation``: the Mooncake FAST'25 conversation trace (Kimi,
  one hour; Apache-2.0).

Conversion keeps the arrival process (a window of it, compressed in time) and
the lengths' shape, and adapts the rest to the fleet at hand: the rate is
scaled by seeded thinning or replication, lengths are scaled and capped for a
small model, and priorities are assigned as in generated traces. Each step
draws from its own seeded stream, so the same options give the same trace.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import date
from importlib import resources

from bench.traces.trace import (
    TRACE_FORMAT,
    PriorityMix,
    Trace,
    TraceError,
    TraceHeader,
    TraceRequest,
)


@dataclass(frozen=True)
class RawRequest:
    """One request as the source recorded it."""

    arrival_s: float
    """Seconds after the source's first request."""
    prompt_tokens: int
    output_tokens: int


def _clock_s(stamp: str) -> float:
    """Seconds since day one of an Azure ``YYYY-MM-DD HH:MM:SS.fffffff``
    timestamp (seven fractional digits, which ``datetime`` does not take)."""
    day, _, clock = stamp.strip().partition(" ")
    hours, minutes, seconds = clock.split(":")
    days = date.fromisoformat(day).toordinal()
    return days * 86400.0 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def parse_azure(lines: Iterable[str]) -> list[RawRequest]:
    """``TIMESTAMP,ContextTokens,GeneratedTokens`` rows (with that header)."""
    rows = csv.DictReader(lines)
    out: list[tuple[float, int, int]] = []
    for number, row in enumerate(rows, 2):
        try:
            stamp = _clock_s(row["TIMESTAMP"])
            out.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
        except (KeyError, ValueError, AttributeError) as exc:
            raise TraceError(f"azure trace line {number}: {exc!r}") from None
    return _relative(out)


def parse_mooncake(lines: Iterable[str]) -> list[RawRequest]:
    """JSONL ``{timestamp (ms), input_length, output_length, hash_ids}``."""
    out: list[tuple[float, int, int]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            lengths = int(row["input_length"]), int(row["output_length"])
            out.append((row["timestamp"] / 1000, *lengths))
        except (KeyError, ValueError, TypeError) as exc:
            raise TraceError(f"mooncake trace line {number}: {exc!r}") from None
    return _relative(out)


def _relative(rows: list[tuple[float, int, int]]) -> list[RawRequest]:
    if not rows:
        raise TraceError("the source trace has no requests")
    rows.sort(key=lambda r: r[0])
    first = rows[0][0]
    return [RawRequest(t - first, max(1, p), max(1, o)) for t, p, o in rows]


@dataclass(frozen=True)
class RealSource:
    name: str
    file: str
    """File in ``bench/traces/data`` (gzip)."""
    parse: Callable[[Iterable[str]], list[RawRequest]]
    attribution: str


SOURCES: dict[str, RealSource] = {
    s.name: s
    for s in (
        RealSource(
            "azure-conv",
            "azure-llm-2023-conv.csv.gz",
            parse_azure,
            "Azure LLM inference trace 2023, conversation (CC BY 4.0; Patel et al., ISCA 2024)",
        ),
        RealSource(
            "azure-code",
            "azure-llm-2023-code.csv.gz",
            parse_azure,
            "Azure LLM inference trace 2023, code (CC BY 4.0; Patel et al., ISCA 2024)",
        ),
        RealSource(
            "mooncake-conversation",
            "mooncake-fast25-conversation.jsonl.gz",
            parse_mooncake,
            "Mooncake FAST'25 conversation trace (Apache-2.0; Qin et al., FAST 2025)",
        ),
    )
}


def read_source(name: str) -> list[RawRequest]:
    """Every request of a shipped source, by arrival."""
    source = SOURCES.get(name)
    if source is None:
        raise TraceError(f"unknown trace source {name!r} (one of {', '.join(SOURCES)})")
    data = resources.files("bench.traces").joinpath("data", source.file)
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        return source.parse(text)


@dataclass(frozen=True)
class ConvertOptions:
    """How a real trace becomes a Shoal trace, step by step in this order."""

    start_s: float = 0.0
    """Window: skip the source's first seconds."""
    duration_s: float | None = None
    """Window: keep this many source seconds (None: to the end)."""
    speedup: float = 1.0
    """Compress time: 10 replays ten source seconds in one."""
    rate_scale: float | None = None
    """Multiply the rate by seeded thinning (< 1) or replication (> 1)."""
    target_rate: float | None = None
    """Or: scale the rate so the mean is this many requests/s (after the speedup)."""
    length_scale: float = 1.0
    """Multiply every prompt and output length (a small model's context)."""
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_total_tokens: int | None = None
    """Cap prompt + output: the output is kept, the prompt shortened."""
    priorities: PriorityMix = field(default_factory=PriorityMix)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.start_s < 0 or (self.duration_s is not None and self.duration_s <= 0):
            raise TraceError("start_s must be >= 0 and duration_s > 0")
        if self.speedup <= 0 or self.length_scale <= 0:
            raise TraceError("speedup and length_scale must be > 0")
        if self.rate_scale is not None and self.target_rate is not None:
            raise TraceError("give rate_scale or target_rate, not both")
        if (self.rate_scale is not None and self.rate_scale <= 0) or (
            self.target_rate is not None and self.target_rate <= 0
        ):
            raise TraceError("rate_scale and target_rate must be > 0")
        caps = (self.max_prompt_tokens, self.max_output_tokens, self.max_total_tokens)
        if any(c is not None and c < 1 for c in caps):
            raise TraceError("token caps must be >= 1")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise TraceError("max_total_tokens must leave a prompt and an output token")


def _stream(seed: int, part: str) -> random.Random:
    return random.Random(f"{TRACE_FORMAT}:real:{seed}:{part}")


def _window(raw: list[RawRequest], opts: ConvertOptions) -> list[RawRequest]:
    end = math.inf if opts.duration_s is None else opts.start_s + opts.duration_s
    kept = [r for r in raw if opts.start_s <= r.arrival_s < end]
    if not kept:
        raise TraceError(f"no requests in the window [{opts.start_s:g}, {end:g}) s")
    return [RawRequest((r.arrival_s - opts.start_s) / opts.speedup, r.prompt_tokens,
                       r.output_tokens) for r in kept]  # fmt: skip


def _span_s(raw: list[RawRequest], opts: ConvertOptions) -> float:
    """The window's length after the speedup (its nominal length if given)."""
    if opts.duration_s is not None:
        return opts.duration_s / opts.speedup
    return max(raw[-1].arrival_s, 1e-9)


def _rescale(raw: list[RawRequest], opts: ConvertOptions) -> tuple[list[RawRequest], float]:
    """Thin or replicate to the asked rate; returns the requests and the scale.
    A replica arrives a random fraction of a mean gap after its original."""
    span = _span_s(raw, opts)
    scale = opts.rate_scale or 1.0
    if opts.target_rate is not None:
        scale = opts.target_rate * span / len(raw)
    if scale == 1.0:
        return raw, scale
    rng, gap = _stream(opts.seed, "rate"), span / len(raw)
    out: list[RawRequest] = []
    for r in raw:
        copies = int(scale) + (rng.random() < scale - int(scale))
        for k in range(copies):
            delay = 0.0 if k == 0 else rng.uniform(0, gap)
            out.append(RawRequest(r.arrival_s + delay, r.prompt_tokens, r.output_tokens))
    if not out:
        raise TraceError(f"rate scale {scale:.3g} kept no request")
    out.sort(key=lambda r: r.arrival_s)
    return out, scale


def fit_lengths(prompt: int, output: int, opts: ConvertOptions) -> tuple[int, int]:
    """Scale, then cap each side, then cap the total (shortening the prompt)."""
    prompt = max(1, round(prompt * opts.length_scale))
    output = max(1, round(output * opts.length_scale))
    if opts.max_prompt_tokens is not None:
        prompt = min(prompt, opts.max_prompt_tokens)
    if opts.max_output_tokens is not None:
        output = min(output, opts.max_output_tokens)
    if opts.max_total_tokens is not None:
        output = min(output, opts.max_total_tokens - 1)
        prompt = min(prompt, opts.max_total_tokens - output)
    return prompt, output


def convert(source: str, opts: ConvertOptions, raw: list[RawRequest] | None = None) -> Trace:
    """The Shoal trace of ``source`` under ``opts`` (``raw``: its requests,
    read from the shipped file when not given)."""
    window = _window(read_source(source) if raw is None else raw, opts)
    scaled, scale = _rescale(window, opts)
    priorities = opts.priorities.assign(_stream(opts.seed, "priority"), len(scaled))
    requests = tuple(
        TraceRequest(
            round(r.arrival_s, 6), *fit_lengths(r.prompt_tokens, r.output_tokens, opts), prio
        )
        for r, prio in zip(scaled, priorities, strict=True)
    )
    settings = asdict(opts)
    settings.pop("priorities")
    attribution = SOURCES[source].attribution if source in SOURCES else ""
    header = TraceHeader(
        seed=opts.seed,
        num_requests=len(requests),
        arrivals={"kind": "real", "source": source, "rate_scale": scale},
        prompt_lengths=f"real:{source}",
        output_lengths=f"real:{source}",
        high_fraction=opts.priorities.high,
        low_fraction=opts.priorities.low,
        max_total_tokens=opts.max_total_tokens,
        source={"name": source, "attribution": attribution, **settings},
    )
    return Trace(header, requests)

"""Named length presets: the Llumnix evaluation's Zipf sets and fits to the
published ShareGPT and BurstGPT statistics (see docs/BENCH_TOOLS.md).

- ``S``, ``M``, ``L``: truncated Zipf over 1..6144 with means 128 / 256 / 512.
  The paper's exponents (2.0 / 1.5 / 1.15) give means of only 5.7 / 60 / 358
  over that range, so the exponent is solved for the mean instead
  (``solve_zipf_alpha``: 1.3586 / 1.2219 / 1.0663).
- ``sharegpt-*``, ``burstgpt-*``: truncated log-normals fitted by
  ``bench.traces.fit`` (parameters below, rerun that module to check them).

A pair preset names the prompt side, then the output side: ``S-L`` is short
prompts with long outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

from bench.traces.fit import PublishedStats
from bench.traces.lengths import (
    LengthDistribution,
    LengthSpecError,
    lognormal,
    parse_lengths,
    solve_zipf_alpha,
    zipf,
)

MAX_LEN = 6144
"""Longest prompt or output any preset draws (the Llumnix range)."""

ZIPF_MEANS = {"S": 128, "M": 256, "L": 512}
PAPER_ZIPF_ALPHAS = {"S": 2.0, "M": 1.5, "L": 1.15}
"""Exponents the Llumnix paper states; kept for reference and ``llumnix-zipf``."""

PUBLISHED: dict[str, PublishedStats] = {
    "sharegpt-prompt": PublishedStats(mean=306, p50=74, p99=3388),
    "sharegpt-output": PublishedStats(mean=500, p50=487, p99=1234),
    "burstgpt-prompt": PublishedStats(mean=830, p99=3549),
    "burstgpt-output": PublishedStats(mean=271, p99=964),
}
"""Length statistics from the Llumnix paper (ShareGPT) and BurstGPT."""

LOGNORMAL_FITS: dict[str, tuple[float, float]] = {
    "sharegpt-prompt": (4.3295, 1.8306),
    "sharegpt-output": (6.1625, 0.4084),
    "burstgpt-prompt": (6.4446, 0.7589),
    "burstgpt-output": (5.403, 0.6311),
}
"""(mu, sigma) of the log-normal over 1..6144 fitted to ``PUBLISHED``."""


@cache
def zipf_set(name: str) -> LengthDistribution:
    """The Zipf set ``S``, ``M`` or ``L`` with its exponent solved for the mean."""
    return zipf(solve_zipf_alpha(ZIPF_MEANS[name], 1, MAX_LEN), 1, MAX_LEN)


@cache
def fitted(name: str) -> LengthDistribution:
    mu, sigma = LOGNORMAL_FITS[name]
    return lognormal(mu, sigma, 1, MAX_LEN)


SIDE_PRESETS: dict[str, Callable[[], LengthDistribution]] = {
    **{name: partial(zipf_set, name) for name in ZIPF_MEANS},
    **{name: partial(fitted, name) for name in LOGNORMAL_FITS},
}
"""One-sided presets, usable wherever a length spec is."""


@dataclass(frozen=True)
class LengthPreset:
    """Prompt and output length distributions under one name."""

    name: str
    prompt: str
    """Spec or side preset of prompt lengths."""
    output: str
    """Spec or side preset of output lengths."""
    description: str


def _presets() -> dict[str, LengthPreset]:
    out = {
        f"{p}-{o}": LengthPreset(
            f"{p}-{o}", p, o, f"Zipf prompts mean {ZIPF_MEANS[p]}, outputs mean {ZIPF_MEANS[o]}"
        )
        for p in ZIPF_MEANS
        for o in ZIPF_MEANS
    }
    for trace in ("sharegpt", "burstgpt"):
        out[trace] = LengthPreset(
            trace,
            f"{trace}-prompt",
            f"{trace}-output",
            f"log-normals fitted to the published {trace} statistics",
        )
    return out


LENGTH_PRESETS: dict[str, LengthPreset] = _presets()
DEFAULT_LENGTH_PRESET = "M-M"


def preset_lengths(name: str) -> tuple[LengthDistribution, LengthDistribution]:
    """(prompt, output) distributions of a named pair preset, e.g. ``S-L``."""
    try:
        preset = LENGTH_PRESETS[name]
    except KeyError:
        known = ", ".join(LENGTH_PRESETS)
        raise LengthSpecError(f"unknown length preset {name!r} (known: {known})") from None
    return parse_lengths(preset.prompt), parse_lengths(preset.output)

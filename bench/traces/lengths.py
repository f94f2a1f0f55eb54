"""Token-length distributions: every one is a table over the integers
``lo..hi``, sampled by inverse CDF from a seeded ``random.Random``.

One representation for all (fixed, uniform, Zipf, log-normal) means one
sampler, exact expected statistics (``mean()``, ``quantile()``) to print beside
the realised ones, and a ``spec`` string that ``parse_lengths`` turns back into
the same distribution, so a trace's header can regenerate it.

Spec grammar: ``KIND:key=value,...`` (``fixed:128`` is short for ``fixed:n=128``)
or a preset name (``S``, ``M``, ``L``, ``sharegpt-prompt``, ...; see presets.py).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from statistics import NormalDist

MAX_TABLE = 1_000_000
"""Largest support (``hi - lo + 1``) a table may have."""


class LengthSpecError(ValueError):
    """A length spec that cannot be parsed or describes no distribution."""


@dataclass(frozen=True)
class LengthDistribution:
    """A distribution of token counts over ``lo..hi``."""

    spec: str
    """Parseable description, e.g. ``zipf:alpha=1.2219,lo=1,hi=6144``."""
    lo: int
    cum_weights: tuple[float, ...]
    """Cumulative (unnormalised) weight of ``lo``, ``lo + 1``, ... ``hi``."""

    @property
    def hi(self) -> int:
        return self.lo + len(self.cum_weights) - 1

    def sample(self, rng: random.Random, n: int) -> list[int]:
        """``n`` independent draws."""
        return rng.choices(range(self.lo, self.hi + 1), cum_weights=self.cum_weights, k=n)

    def mean(self) -> float:
        """Exact expected value."""
        total, prev, acc = self.cum_weights[-1], 0.0, 0.0
        for i, cum in enumerate(self.cum_weights):
            acc += (self.lo + i) * (cum - prev)
            prev = cum
        return acc / total

    def quantile(self, q: float) -> int:
        """Smallest value whose cumulative probability is at least ``q``."""
        i = bisect.bisect_left(self.cum_weights, q * self.cum_weights[-1])
        return self.lo + min(i, len(self.cum_weights) - 1)


def from_weights(spec: str, lo: int, weights: Sequence[float]) -> LengthDistribution:
    if lo < 1:
        raise LengthSpecError(f"{spec}: lengths start at 1 (lo={lo})")
    if not weights or len(weights) > MAX_TABLE:
        raise LengthSpecError(f"{spec}: support of {len(weights)} values (1..{MAX_TABLE})")
    cum = tuple(accumulate(weights))
    if not cum[-1] > 0 or not math.isfinite(cum[-1]):
        raise LengthSpecError(f"{spec}: weights sum to {cum[-1]}")
    return LengthDistribution(spec, lo, cum)


def _check_range(kind: str, lo: int, hi: int) -> None:
    if not 1 <= lo <= hi:
        raise LengthSpecError(f"{kind}: need 1 <= lo <= hi (lo={lo}, hi={hi})")


def fixed(n: int) -> LengthDistribution:
    """Always ``n`` tokens."""
    return from_weights(f"fixed:{n}", n, [1.0])


def uniform(lo: int, hi: int) -> LengthDistribution:
    """Every value in ``lo..hi`` equally likely."""
    _check_range("uniform", lo, hi)
    return from_weights(f"uniform:lo={lo},hi={hi}", lo, [1.0] * (hi - lo + 1))


def zipf(alpha: float, lo: int = 1, hi: int = 6144) -> LengthDistribution:
    """Truncated Zipf: P(k) proportional to k**-alpha for k in lo..hi."""
    _check_range("zipf", lo, hi)
    spec = f"zipf:alpha={alpha!r},lo={lo},hi={hi}"
    return from_weights(spec, lo, [k**-alpha for k in range(lo, hi + 1)])


def zipf_mean(alpha: float, lo: int, hi: int) -> float:
    """Expected value of ``zipf(alpha, lo, hi)``."""
    ks = range(lo, hi + 1)
    return math.fsum(k ** (1 - alpha) for k in ks) / math.fsum(k**-alpha for k in ks)


def solve_zipf_alpha(mean: float, lo: int = 1, hi: int = 6144) -> float:
    """The exponent whose truncated Zipf over ``lo..hi`` has this mean.

    The mean falls monotonically from ``(lo + hi) / 2`` at alpha = 0 towards
    ``lo`` as alpha grows, so bisection finds it; rounded to 4 decimals so the
    spec written into a trace reproduces the same table."""
    _check_range("zipf", lo, hi)
    if not lo < mean < (lo + hi) / 2:
        raise LengthSpecError(f"zipf: mean {mean} must lie in ({lo}, {(lo + hi) / 2})")
    a, b = 0.0, 1.0
    while zipf_mean(b, lo, hi) > mean:
        a, b = b, 2 * b
    while b - a > 1e-6:
        mid = (a + b) / 2
        a, b = (mid, b) if zipf_mean(mid, lo, hi) > mean else (a, mid)
    return round((a + b) / 2, 4)


def lognormal(mu: float, sigma: float, lo: int = 1, hi: int = 6144) -> LengthDistribution:
    """A log-normal rounded to the nearest integer and truncated to ``lo..hi``
    (mass outside is dropped, not piled on the bounds)."""
    _check_range("lognormal", lo, hi)
    if not sigma > 0:
        raise LengthSpecError(f"lognormal: sigma must be > 0 (got {sigma})")
    dist = NormalDist(mu, sigma)
    cdf = [dist.cdf(math.log(k - 0.5)) for k in range(lo, hi + 2)]  # bin edges k +- 0.5
    weights = [cdf[i + 1] - cdf[i] for i in range(hi - lo + 1)]
    return from_weights(f"lognormal:mu={mu!r},sigma={sigma!r},lo={lo},hi={hi}", lo, weights)


def llumnix_zipf(mean: int, alpha: float, hi: int = 6144) -> LengthDistribution:
    """Lengths as Llumnix's public benchmark draws them: Zipf(alpha) ranks in
    ``1..2*mean-1``, scaled so the mean is ``mean``, rounded up, capped at
    ``hi``. The support is a lattice (multiples of the scale factor)."""
    if mean < 2 or hi < 1:
        raise LengthSpecError(f"llumnix-zipf: need mean >= 2, hi >= 1 (mean={mean}, hi={hi})")
    ranks = range(1, 2 * mean)
    scale = mean / zipf_mean(alpha, 1, 2 * mean - 1)
    weights = [0.0] * hi
    for k in ranks:
        weights[min(hi, math.ceil(k * scale)) - 1] += k**-alpha
    first = next(i for i, w in enumerate(weights) if w > 0)
    spec = f"llumnix-zipf:mean={mean},alpha={alpha!r},hi={hi}"
    return from_weights(spec, first + 1, weights[first:])


def _kwargs(kind: str, body: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, body.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise LengthSpecError(f"{kind}: expected key=value, got {part!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise LengthSpecError(f"{kind}: {key} is not a number ({value!r})") from None
    return out


def _int(value: float) -> int:
    if not float(value).is_integer():
        raise LengthSpecError(f"expected a whole number of tokens, got {value}")
    return int(value)


def _zipf_spec(
    mean: float | None = None, alpha: float | None = None, lo: float = 1, hi: float = 6144
) -> LengthDistribution:
    if (mean is None) == (alpha is None):
        raise LengthSpecError("zipf: give exactly one of mean= or alpha=")
    if alpha is None:
        assert mean is not None
        alpha = solve_zipf_alpha(mean, _int(lo), _int(hi))
    return zipf(alpha, _int(lo), _int(hi))


_KINDS: dict[str, Callable[..., LengthDistribution]] = {
    "fixed": lambda n: fixed(_int(n)),
    "uniform": lambda lo, hi: uniform(_int(lo), _int(hi)),
    "zipf": _zipf_spec,
    "lognormal": lambda mu, sigma, lo=1.0, hi=6144.0: lognormal(mu, sigma, _int(lo), _int(hi)),
    "llumnix-zipf": lambda mean, alpha, hi=6144.0: llumnix_zipf(_int(mean), alpha, _int(hi)),
}


def parse_lengths(spec: str) -> LengthDistribution:
    """A distribution from a spec string or a one-sided preset name."""
    from bench.traces.presets import SIDE_PRESETS

    spec = spec.strip()
    if spec in SIDE_PRESETS:
        return SIDE_PRESETS[spec]()
    kind, _, body = spec.partition(":")
    make = _KINDS.get(kind)
    if make is None:
        known = ", ".join([*_KINDS, *SIDE_PRESETS])
        raise LengthSpecError(f"unknown lengths {spec!r} (known: {known})")
    if kind == "fixed" and "=" not in body:
        body = f"n={body}"
    try:
        return make(**_kwargs(kind, body))
    except TypeError as exc:
        raise LengthSpecError(f"{spec}: {exc}") from None

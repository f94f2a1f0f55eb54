"""Fitting a truncated, rounded log-normal to published length statistics.

The ShareGPT and BurstGPT presets come from here: for each side (prompt,
output) the published mean, P99 and (where given) P50 are the targets, and
(mu, sigma) minimise the sum of squared log-ratios between the *exact*
statistics of the discrete distribution ``lognormal(mu, sigma, 1, 6144)`` and
the targets (a small Nelder-Mead from the closed-form start). With two targets
(BurstGPT) the fit is exact; with three (ShareGPT) a log-normal cannot meet
all of them and the residuals are printed.

    .venv/bin/python -m bench.traces.fit
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

from bench.traces.lengths import LengthDistribution, lognormal

Z99 = NormalDist().inv_cdf(0.99)
Point = tuple[float, float]


@dataclass(frozen=True)
class PublishedStats:
    """Length statistics as a paper reports them (tokens)."""

    mean: float
    p99: float
    p50: float | None = None


def stats_of(dist: LengthDistribution) -> PublishedStats:
    """The exact mean, P99 and P50 of a distribution."""
    return PublishedStats(dist.mean(), dist.quantile(0.99), dist.quantile(0.5))


def smooth_stats_of(dist: LengthDistribution) -> PublishedStats:
    """Like ``stats_of`` with quantiles interpolated inside the bin
    ``[k - 0.5, k + 0.5)`` of each value, so the fit's loss is smooth."""

    def quantile(q: float) -> float:
        k = dist.quantile(q)
        i = k - dist.lo
        below = dist.cum_weights[i - 1] if i > 0 else 0.0
        share = (q * dist.cum_weights[-1] - below) / (dist.cum_weights[i] - below)
        return k - 0.5 + share

    return PublishedStats(dist.mean(), quantile(0.99), quantile(0.5))


def _loss(target: PublishedStats, got: PublishedStats) -> float:
    pairs = [(got.mean, target.mean), (got.p99, target.p99)]
    if target.p50 is not None and got.p50 is not None:
        pairs.append((got.p50, target.p50))
    return sum(math.log(g / t) ** 2 for g, t in pairs)


def _start(target: PublishedStats) -> tuple[float, float]:
    """Closed form for an untruncated log-normal: P50 and P99 pinned, or
    (without a P50) mean and P99 pinned."""
    if target.p50 is not None:
        mu = math.log(target.p50)
        return mu, (math.log(target.p99) - mu) / Z99
    gap = math.log(target.p99) - math.log(target.mean)  # = Z*s - s^2/2
    sigma = Z99 - math.sqrt(Z99 * Z99 - 2 * gap)
    return math.log(target.mean) - sigma * sigma / 2, sigma


def _nelder_mead(
    f: Callable[[float, float], float],
    x0: tuple[float, float],
    step: float = 0.05,
    tol: float = 1e-6,
) -> tuple[float, float]:
    pts = [x0, (x0[0] + step, x0[1]), (x0[0], x0[1] + step)]
    vals = [f(*p) for p in pts]
    for _ in range(500):
        if max(abs(a - b) for p in pts[1:] for a, b in zip(p, pts[0], strict=True)) < tol:
            break
        order = sorted(range(3), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centre = ((pts[0][0] + pts[1][0]) / 2, (pts[0][1] + pts[1][1]) / 2)

        def toward(t: float, c: tuple[float, float] = centre, w: Point = pts[2]) -> Point:
            """The point ``c + t * (w - c)``: -1 reflects the worst point, -2
            expands, 0.5 contracts."""
            return c[0] + t * (w[0] - c[0]), c[1] + t * (w[1] - c[1])

        trial = toward(-1.0)
        f_trial = f(*trial)
        if f_trial < vals[0]:
            grown = toward(-2.0)
            f_grown = f(*grown)
            pts[2], vals[2] = (grown, f_grown) if f_grown < f_trial else (trial, f_trial)
        elif f_trial < vals[1]:
            pts[2], vals[2] = trial, f_trial
        else:
            shrunk = toward(0.5)
            f_shrunk = f(*shrunk)
            if f_shrunk < vals[2]:
                pts[2], vals[2] = shrunk, f_shrunk
            else:
                best = pts[0]
                pts = [best] + [((p[0] + best[0]) / 2, (p[1] + best[1]) / 2) for p in pts[1:]]
                vals = [vals[0]] + [f(*p) for p in pts[1:]]
    return pts[min(range(3), key=vals.__getitem__)]


def fit_lognormal(target: PublishedStats, lo: int = 1, hi: int = 6144) -> tuple[float, float]:
    """(mu, sigma), rounded to 4 decimals, of the best truncated log-normal."""

    def loss(mu: float, sigma: float) -> float:
        if sigma <= 0.01:
            return math.inf
        return _loss(target, smooth_stats_of(lognormal(mu, sigma, lo, hi)))

    mu, sigma = _nelder_mead(loss, _start(target))
    return round(mu, 4), round(sigma, 4)


def main() -> None:
    from bench.traces.presets import LOGNORMAL_FITS, PUBLISHED

    print(f"{'side':18} {'mu':>7} {'sigma':>7}  {'mean':>14} {'p50':>12} {'p99':>14}")
    for name, target in PUBLISHED.items():
        mu, sigma = fit_lognormal(target)
        got = stats_of(lognormal(mu, sigma))
        p50 = f"{got.p50:.0f}/{target.p50:.0f}" if target.p50 else f"{got.p50:.0f}/-"
        note = "" if (mu, sigma) == LOGNORMAL_FITS[name] else "  (differs from presets.py)"
        print(
            f"{name:18} {mu:7.4f} {sigma:7.4f}  {got.mean:7.1f}/{target.mean:<6.0f} "
            f"{p50:>12} {got.p99:7.0f}/{target.p99:<6.0f}{note}"
        )


if __name__ == "__main__":
    main()

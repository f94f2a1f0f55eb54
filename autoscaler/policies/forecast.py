"""Demand forecasting for the ``slo`` scaling policy: Holt's linear trend
(double exponential smoothing) over a series sampled at a fixed interval,
with the spread of its forecast errors.

Each observation updates a level and a trend; the one-step errors update an
exponentially weighted variance. The forecast ``h`` steps ahead is
``level + h * trend`` and its standard deviation follows Holt's
prediction-interval formula (Hyndman & Athanasopoulos, *Forecasting:
Principles and Practice*, §8.7)::

    sigma_h^2 = sigma^2 * (1 + (h - 1) * (alpha^2 + alpha*beta*h + beta^2*h*(2h - 1) / 6))

Small smoothing weights follow a ramp (the trend carries the forecast a
horizon ahead of it) without chasing noise (one noisy sample moves the level
by ``alpha`` of its error and the trend by ``alpha * beta``). The state is a
frozen dataclass of floats, so it serialises with the autoscaler's state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class HoltConfig:
    alpha: float = 0.3
    """Weight of a new observation in the level."""
    beta: float = 0.1
    """Weight of a new level change in the trend."""
    variance_weight: float = 0.1
    """Weight of a new squared one-step error in the error variance."""

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "variance_weight"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class Forecast:
    mean: float
    """Expected value ``steps`` ahead (never below 0)."""
    std: float
    """Standard deviation of that forecast's error."""

    def upper(self, z: float) -> float:
        """``mean + z * std``: the bound the fleet is sized for."""
        return self.mean + z * self.std


@dataclass(frozen=True)
class HoltState:
    level: float = 0.0
    trend: float = 0.0
    variance: float = 0.0
    """Exponentially weighted mean of squared one-step errors."""
    count: int = 0
    """Observations so far (0: nothing known)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HoltState:
        return cls(float(data["level"]), float(data["trend"]), float(data["variance"]),
                   int(data["count"]))  # fmt: skip


def observe(state: HoltState, value: float, cfg: HoltConfig) -> HoltState:
    """The state after one more observation."""
    if state.count == 0:
        return HoltState(level=value, count=1)
    if state.count == 1:
        trend = value - state.level
        return HoltState(level=value, trend=trend, variance=trend * trend, count=2)
    predicted = state.level + state.trend
    error = value - predicted
    level = predicted + cfg.alpha * error
    trend = state.trend + cfg.beta * (level - state.level - state.trend)
    variance = state.variance + cfg.variance_weight * (error * error - state.variance)
    return replace(state, level=level, trend=trend, variance=variance, count=state.count + 1)


def forecast(state: HoltState, steps: float, cfg: HoltConfig) -> Forecast:
    """The forecast ``steps`` intervals ahead (fractional steps allowed)."""
    h = max(steps, 1.0)
    a, b = cfg.alpha, cfg.beta
    spread = 1 + (h - 1) * (a * a + a * b * h + b * b * h * (2 * h - 1) / 6)
    return Forecast(max(0.0, state.level + h * state.trend), math.sqrt(state.variance * spread))


def peak_forecast(state: HoltState, steps: float, cfg: HoltConfig, z: float) -> float:
    """The highest upper bound ``mean + z * std`` over the next ``steps``
    intervals (checked at every whole step and at ``steps``)."""
    points = [*range(1, math.ceil(steps)), max(steps, 1.0)]
    return max(forecast(state, h, cfg).upper(z) for h in points)

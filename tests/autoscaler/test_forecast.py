"""Holt's linear trend: it leads a ramp by the horizon, settles on a step,
does not chase noise, beats persistence on a slow cycle, and its state
round-trips through JSON."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from autoscaler.policies.forecast import (
    HoltConfig,
    HoltState,
    forecast,
    observe,
    peak_forecast,
)

CFG = HoltConfig()


def _fit(series: list[float], cfg: HoltConfig = CFG) -> HoltState:
    state = HoltState()
    for value in series:
        state = observe(state, value, cfg)
    return state


def test_nothing_known_forecasts_zero() -> None:
    f = forecast(HoltState(), 10, CFG)
    assert f.mean == 0 and f.std == 0


def test_it_leads_a_ramp_by_the_horizon() -> None:
    horizon = 12
    ramp = [2.0 + 0.5 * t for t in range(60)]
    state = _fit(ramp)
    ahead = forecast(state, horizon, CFG).mean
    assert ahead == pytest.approx(2.0 + 0.5 * (59 + horizon), rel=0.02)
    assert ahead > ramp[-1] + 0.9 * 0.5 * horizon  # not the last value: ahead of it


def test_it_settles_on_a_step_without_running_away() -> None:
    series = [10.0] * 30 + [30.0] * 60
    state = HoltState()
    seen: list[float] = []
    for value in series:
        state = observe(state, value, CFG)
        seen.append(forecast(state, 1, CFG).mean)
    assert seen[29] == pytest.approx(10.0)
    assert max(seen) < 30.0 + 0.5 * 20.0  # overshoots by less than half the step
    assert forecast(state, 10, CFG).mean == pytest.approx(30.0, abs=1.0)


def test_it_does_not_chase_noise() -> None:
    rng = random.Random(3)
    series = [max(0.0, rng.gauss(20.0, 4.0)) for _ in range(400)]
    state = HoltState()
    means: list[float] = []
    for t, value in enumerate(series):
        state = observe(state, value, CFG)
        if t > 50:
            means.append(forecast(state, 10, CFG).mean)
    # The forecasts spread less than the samples do, around the true mean.
    assert statistics.pstdev(means) < statistics.pstdev(series)
    assert statistics.fmean(means) == pytest.approx(20.0, abs=1.5)
    # The error spread it reports is the noise's, not zero and not runaway.
    assert math.sqrt(state.variance) == pytest.approx(4.0 * 1.2, rel=0.5)


def test_it_beats_persistence_on_a_slow_cycle() -> None:
    horizon = 5
    cycle = [50 + 30 * math.sin(2 * math.pi * t / 120) for t in range(480)]
    state = HoltState()
    holt_errors, naive_errors = [], []
    for t, value in enumerate(cycle[:-horizon]):
        state = observe(state, value, CFG)
        if t >= 120:
            truth = cycle[t + horizon]
            holt_errors.append(abs(forecast(state, horizon, CFG).mean - truth))
            naive_errors.append(abs(value - truth))
    assert statistics.fmean(holt_errors) < statistics.fmean(naive_errors)


def test_the_spread_grows_with_the_horizon_and_the_peak_bounds_it() -> None:
    rng = random.Random(1)
    state = _fit([10 + rng.gauss(0, 2) for _ in range(100)])
    spreads = [forecast(state, h, CFG).std for h in (1, 5, 20)]
    assert spreads == sorted(spreads) and spreads[0] > 0
    peak = peak_forecast(state, 20, CFG, z=2.0)
    assert peak >= max(forecast(state, h, CFG).upper(2.0) for h in range(1, 21))
    falling = _fit([100.0 - 2 * t for t in range(40)])
    assert peak_forecast(falling, 10, CFG, z=0.0) == pytest.approx(forecast(falling, 1, CFG).mean)


def test_forecasts_never_go_below_zero() -> None:
    state = _fit([40.0 - 2 * t for t in range(20)])
    assert forecast(state, 100, CFG).mean == 0.0


def test_the_state_round_trips_through_json() -> None:
    state = _fit([1.0, 4.0, 2.0, 8.0])
    assert HoltState.from_json(json.loads(json.dumps(state.to_json()))) == state


@pytest.mark.parametrize("field", ["alpha", "beta", "variance_weight"])
def test_weights_outside_zero_to_one_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HoltConfig(**{field: 0.0})

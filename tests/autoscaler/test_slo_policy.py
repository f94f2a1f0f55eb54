"""The ``slo`` scaling policy over hand-built snapshots with an injected
clock: it scales out ahead of a rising forecast, panics on a breach, keeps
its instances while the forecast needs them, learns the cold start, and its
state survives JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

from autoscaler.decisions import Decision, Drain, ScaleOut
from autoscaler.policies import SCALING, ScalingConfig, ScalingState
from autoscaler.policies.slo import breach, learn, plan
from autoscaler.snapshot import InstanceState, Snapshot
from infra.records import InstanceStatus, Priority
from infra.traffic import Latency, Traffic
from tests.autoscaler.snapshots import inst

slo = SCALING.get("slo")
CFG = ScalingConfig(
    min_instances=1, max_instances=10, freeness_low=10, freeness_high=60, scale_out_ticks=3,
    scale_in_ticks=3, cooldown_s=5, idle_timeout_s=600, forecast_interval_s=5,
    assumed_cold_start_s=30, forecast_z=1.0, slo_min_samples=5,
)  # fmt: skip


def traffic(rate: float, *, high_ttft: float | None = None, n: int = 50) -> Traffic:
    latency = {} if high_ttft is None else {Priority.HIGH: Latency(n, high_ttft)}
    return Traffic(30.0, 5.0, rate, rate * 100, latency)


def instances(count: int, *, running: int, used: int) -> tuple[InstanceState, ...]:
    return tuple(inst(f"i{k}", running=running, used=used) for k in range(count))


def shot(
    now: float, insts: tuple[InstanceState, ...], t: Traffic | None, held: int = 0
) -> Snapshot:
    return Snapshot(now, insts, held, frozenset(), t)


def loaded(count: int, rate: float) -> tuple[InstanceState, ...]:
    """``count`` instances whose load follows the rate (Little's law: two
    running requests per req/s spread over them, 10 blocks each)."""
    running = max(1, round(2 * rate / count))
    return instances(count, running=running, used=10 * running)


def drive(
    make: Callable[[float], Snapshot], times: list[float], cfg: ScalingConfig = CFG,
    state: ScalingState | None = None,
) -> tuple[list[list[Decision]], ScalingState]:  # fmt: skip
    state = state or ScalingState()
    out = []
    for t in times:
        decisions, state = slo(make(t), cfg, state)
        out.append(list(decisions))
    return out, state


def scale_outs(out: list[list[Decision]]) -> list[tuple[int, ScaleOut]]:
    return [(k, d) for k, ds in enumerate(out) for d in ds if isinstance(d, ScaleOut)]


STEADY = instances(4, running=1, used=10)


def test_steady_load_asks_for_no_more_instances() -> None:
    out, state = drive(lambda t: shot(t, STEADY, traffic(2.0)), [5.0 * k for k in range(40)])
    assert scale_outs(out) == []
    assert state.rps_per_instance is not None and state.target is not None


def test_it_scales_out_ahead_of_a_ramp_before_the_load_needs_it() -> None:
    """The rate climbs; the instances' load follows it. The first scale-out
    comes while today's load still fits the fleet (the band's sizing would
    not yet ask), because the forecast a cold start ahead does not."""

    def rate(t: float) -> float:
        return 2.0 + 0.05 * max(0.0, t - 100)

    def at(t: float) -> Snapshot:
        return shot(t, loaded(4, rate(t)), traffic(rate(t)))

    times = [5.0 * k for k in range(60)]
    out, _ = drive(at, times)
    first = scale_outs(out)
    assert first, "no scale-out on a ramp"
    k, decision = first[0]
    _, before = drive(at, times[:k])
    p = plan(at(times[k]), CFG, learn(at(times[k]), CFG, before))
    assert p.current_need <= 4 < p.target
    assert "forecast" in decision.reason


def test_a_breach_panics_out_and_blocks_scale_in() -> None:
    calm = instances(4, running=1, used=5)
    cfg = replace(CFG, slo_ttft_high_s=1.0)
    state = ScalingState()
    ok, state = slo(shot(0.0, calm, traffic(1.0)), cfg, state)
    assert ok == []
    out, state = slo(shot(5.0, calm, traffic(1.0, high_ttft=2.5)), cfg, state)
    assert [d.count for d in out if isinstance(d, ScaleOut)] == [2]  # 4 * 1.5 = 6
    assert "high TTFT P99 2.50s" in out[0].reason  # type: ignore[union-attr]
    assert state.panic_until_s == 5.0 + cfg.panic_window_s
    # Few samples are no evidence.
    assert breach(shot(5.0, calm, traffic(1.0, high_ttft=9.0, n=2)), cfg, ScalingState()) is None


def test_held_requests_are_a_breach() -> None:
    assert (
        breach(shot(0.0, STEADY, traffic(1.0), held=3), CFG, ScalingState()) == "3 request(s) held"
    )


def test_scale_in_waits_for_the_forecast_and_the_panic_window() -> None:
    big = loaded(6, 0.5)
    quiet = [5.0 * k for k in range(30)]
    cfg = replace(CFG, panic_window_s=60)
    state = replace(ScalingState(), panic_until_s=50.0)
    out, _ = drive(lambda t: shot(t, big, traffic(0.5)), quiet, cfg, state)
    drains = [(k, d) for k, ds in enumerate(out) for d in ds if isinstance(d, Drain)]
    assert drains, "never scaled in on a quiet forecast"
    assert quiet[drains[0][0]] >= 50.0 + 2 * 5  # after the window, and after scale_in_ticks

    # A rising forecast holds the instances even when today's load is small.
    def rising_rate(t: float) -> float:
        return 0.5 + 0.1 * t

    def rising(t: float) -> Snapshot:
        return shot(t, loaded(6, rising_rate(t)), traffic(rising_rate(t)))

    held, _ = drive(rising, quiet, cfg)
    assert not any(isinstance(d, Drain) for ds in held for d in ds)


def test_the_cold_start_is_learned_from_an_instance_becoming_ready() -> None:
    starting = InstanceState("new", InstanceStatus.STARTING, None, started_at=10.0)
    state = learn(shot(12.0, (*STEADY, starting), None), CFG, ScalingState())
    assert state.cold_start_s is None and state.starting == (("new", 10.0),)
    ready = replace(inst("new", running=0, used=0), started_at=10.0)
    state = learn(shot(52.0, (*STEADY, ready), None), CFG, state)
    assert state.cold_start_s == 42.0
    p = plan(shot(55.0, (*STEADY, ready), traffic(1.0)), CFG, state)
    assert p.horizon_s > 42.0


def test_without_traffic_it_sizes_by_the_current_load() -> None:
    hot = instances(2, running=10, used=95)  # (35*20 + 190) / 100 -> 9 instances
    out, _ = slo(shot(0.0, hot, None), CFG, ScalingState())
    assert out == [ScaleOut(7, out[0].reason)]  # type: ignore[union-attr]


def test_the_state_round_trips_through_json() -> None:
    _, state = drive(
        lambda t: shot(t, STEADY, traffic(2.0 + 0.1 * t)), [5.0 * k for k in range(12)]
    )
    starting = InstanceState("s", InstanceStatus.STARTING, None, started_at=1.0)
    state = learn(shot(61.0, (*STEADY, starting), traffic(3.0)), CFG, state)
    again = ScalingState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state

"""The ``slo`` scaling policy: size the fleet for the demand forecast one
cold start ahead, panic on an SLO breach, scale in only when the forecast
over the horizon allows it.

Each tick it

1. learns: the tick interval, the cold start (the launch-to-active time of an
   instance that was starting at the previous tick), the arrival and token
   rates' forecasters (Holt's linear trend, :mod:`.forecast`), and the rates
   one instance takes at the band's middle (today's rates over today's
   :func:`band_demand`);
2. sets a target: the most instances needed by the current load (the band's
   sizing) and by the upper forecast of either rate at any point of the next
   cold start plus a tick (``forecast_z`` standard deviations of headroom);
3. panics when a priority's TTFT or TPOT P99 is over its target, requests are
   held, or the queue grew for ``scale_out_ticks`` ticks: the target becomes
   at least ``panic_scale`` times the active instances (once per cold start),
   and nothing scales in for ``panic_window_s``;
4. scales out to the target (the target counts starting instances, so a ramp
   is not ordered twice), or scales in by draining the instance cheapest to
   empty when the target has stayed below the active count for
   ``scale_in_ticks`` ticks and the others stay above the band's bottom.

Drained instances stop, the floor and scale to zero hold, as in ``band``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from autoscaler.decisions import Decision, Drain, ScaleOut
from autoscaler.policies.forecast import HoltConfig, observe, peak_forecast
from autoscaler.policies.scaling import (
    SCALING,
    ScalingConfig,
    ScalingState,
    Step,
    band_demand,
    cheapest_to_empty,
    floor,
    projected_freeness,
    scale_to_zero,
    stops,
    track_idle,
)
from autoscaler.snapshot import Snapshot
from infra.records import Priority
from infra.traffic import Traffic

FORECAST = HoltConfig()
LEARNING_WEIGHT = 0.1
"""Weight of a new sample in the learned tick interval and capacities."""
DEFAULT_TICK_S = 1.0
"""Tick interval assumed before two ticks have been seen."""


@dataclass(frozen=True)
class Plan:
    """One tick's sizing, with the numbers behind it (for reasons and status)."""

    target: int
    current_need: float
    """Instances today's load needs at the band's middle (fractional)."""
    peak_rps: float | None
    peak_tps: float | None
    horizon_s: float
    breach: str | None
    """Why the policy panics this tick, if it does."""


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + LEARNING_WEIGHT * (new - old)


def learn(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> ScalingState:
    """Update what the policy learns from one snapshot (pure)."""
    tick_s = state.tick_s
    if state.last_tick_s is not None and snap.now > state.last_tick_s:
        tick_s = _ewma(tick_s, snap.now - state.last_tick_s)
    cold_start_s = state.cold_start_s
    active = {i.instance_id for i in snap.active}
    for instance_id, started_at in state.starting:
        if instance_id in active:
            cold_start_s = snap.now - started_at
    state = replace(
        state,
        tick_s=tick_s,
        last_tick_s=snap.now,
        cold_start_s=cold_start_s,
        starting=tuple((i.instance_id, i.started_at) for i in snap.starting),
    )
    waiting = sum(i.load.num_waiting for i in snap.active if i.load is not None)
    growth = state.num_queue_growth_ticks + 1 if waiting > state.num_waiting else 0
    state = replace(state, num_waiting=waiting, num_queue_growth_ticks=growth)
    traffic = snap.traffic
    if traffic is None or snap.now - state.last_observed_s < cfg.forecast_interval_s:
        return state
    state = replace(
        state,
        last_observed_s=snap.now,
        arrivals=observe(state.arrivals, traffic.arrival_rate, FORECAST),
        tokens=observe(state.tokens, traffic.token_rate, FORECAST),
    )
    need = band_demand(snap.active, cfg)
    if traffic.arrival_rate > 0 and need > 0 and not snap.starting and snap.num_held == 0:
        state = replace(
            state,
            rps_per_instance=_ewma(state.rps_per_instance, traffic.arrival_rate / need),
            tps_per_instance=_ewma(state.tps_per_instance, traffic.token_rate / need),
        )
    return state


def slo_targets(cfg: ScalingConfig) -> dict[Priority, tuple[float, float]]:
    """(TTFT P99, TPOT P99) target of each priority."""
    return {
        Priority.HIGH: (cfg.slo_ttft_high_s, cfg.slo_tpot_high_s),
        Priority.NORMAL: (cfg.slo_ttft_normal_s, cfg.slo_tpot_normal_s),
        Priority.LOW: (cfg.slo_ttft_low_s, cfg.slo_tpot_low_s),
    }


def breach(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> str | None:
    """Why capacity is short now, or None."""
    if snap.num_held > 0:
        return f"{snap.num_held} request(s) held"
    if state.num_queue_growth_ticks >= cfg.scale_out_ticks:
        return f"queue grew for {state.num_queue_growth_ticks} ticks to {state.num_waiting}"
    if snap.traffic is not None:
        return _latency_breach(snap.traffic, cfg)
    return None


def _latency_breach(traffic: Traffic, cfg: ScalingConfig) -> str | None:
    """The first priority whose TTFT or TPOT P99 (over enough requests) is
    over its target."""
    enough = cfg.slo_min_samples
    for prio, (ttft_target, tpot_target) in slo_targets(cfg).items():
        seen = traffic.of(prio)
        ttft = seen.ttft_p99_s if seen.num_first_tokens >= enough else None
        tpot = seen.tpot_p99_s if seen.num_finished >= enough else None
        if ttft is not None and ttft > ttft_target:
            return f"{prio.value} TTFT P99 {ttft:.2f}s over its {ttft_target:g}s target"
        if tpot is not None and tpot > tpot_target:
            return f"{prio.value} TPOT P99 {tpot:.3f}s over its {tpot_target:g}s target"
    return None


def plan(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> Plan:
    """The target instance count for this tick (pure; ``state`` already learned)."""
    tick_s = state.tick_s or DEFAULT_TICK_S
    cold_start = cfg.assumed_cold_start_s if state.cold_start_s is None else state.cold_start_s
    horizon_s = cold_start + tick_s
    need = band_demand(snap.active, cfg)
    wanted = need
    peak_rps = peak_tps = None
    if snap.traffic is not None:
        steps = horizon_s / cfg.forecast_interval_s
        peak_rps = peak_forecast(state.arrivals, steps, FORECAST, cfg.forecast_z)
        peak_tps = peak_forecast(state.tokens, steps, FORECAST, cfg.forecast_z)
        if state.rps_per_instance:
            wanted = max(wanted, peak_rps / state.rps_per_instance)
        if state.tps_per_instance:
            wanted = max(wanted, peak_tps / state.tps_per_instance)
        if peak_rps > 0:
            wanted = max(wanted, 1.0)
    why = breach(snap, cfg, state)
    target = math.ceil(wanted - 1e-9)
    if why is not None and snap.now - state.last_panic_s >= cold_start:
        target = max(target, math.ceil(len(snap.active) * cfg.panic_scale), len(snap.active) + 1)
    target = min(max(target, cfg.min_instances), cfg.max_instances)
    return Plan(target, need, peak_rps, peak_tps, horizon_s, why)


def _describe(p: Plan) -> str:
    parts = [f"target {p.target} (load needs {p.current_need:.1f}"]
    if p.peak_rps is not None and p.peak_tps is not None:
        parts.append(f"; forecast over {p.horizon_s:.0f}s: {p.peak_rps:.2f} req/s, "
                     f"{p.peak_tps:.0f} tok/s")  # fmt: skip
    parts.append(")")
    if p.breach is not None:
        parts.append(f"; panic: {p.breach}")
    return "".join(parts)


@SCALING.register("slo")
def slo(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> Step:
    """Scale for the forecast demand a cold start ahead; panic on a breach."""
    state = learn(snap, cfg, state)
    decisions = stops(snap) + floor(snap, cfg)
    if any(isinstance(d, ScaleOut) for d in decisions):
        return decisions, replace(state, last_change_s=snap.now, num_high_ticks=0)
    if not snap.active:
        return decisions, replace(state, num_high_ticks=0, idle_since_s=None)
    p = plan(snap, cfg, state)
    state = replace(state, target=p.target)
    if p.breach is not None:
        state = replace(state, panic_until_s=snap.now + cfg.panic_window_s)
    live = len(snap.active) + len(snap.starting)
    if p.target > live:
        out = ScaleOut(p.target - live, _describe(p))
        panicked = p.breach is not None and p.target > math.ceil(p.current_need)
        state = replace(state, last_change_s=snap.now, num_high_ticks=0)
        if panicked:
            state = replace(state, last_panic_s=snap.now)
        return [*decisions, out], state
    state = track_idle(snap, state)
    if drains := scale_to_zero(snap, cfg, state):
        return [*decisions, *drains], replace(state, idle_since_s=None, last_change_s=snap.now)
    return _scale_in(snap, cfg, state, p, decisions)


def _scale_in(
    snap: Snapshot, cfg: ScalingConfig, state: ScalingState, p: Plan, decisions: list[Decision]
) -> Step:
    surplus = p.target < len(snap.active) and snap.now >= state.panic_until_s
    state = replace(state, num_high_ticks=state.num_high_ticks + 1 if surplus else 0)
    if (
        state.num_high_ticks < cfg.scale_in_ticks
        or snap.now - state.last_change_s < cfg.cooldown_s
        or snap.starting
        or snap.draining
        or len(snap.active) <= max(cfg.min_instances, 1)
    ):
        return decisions, state
    victim = cheapest_to_empty(snap.active)
    if projected_freeness(snap, victim) <= cfg.freeness_low:
        return decisions, state
    drain = Drain(victim.instance_id, f"{_describe(p)} for {state.num_high_ticks} ticks")
    return [*decisions, drain], replace(state, num_high_ticks=0, last_change_s=snap.now)

"""Scaling policies: ``policy(snapshot, config, state) -> (decisions, state)``.

``band`` (the default) keeps the average freeness of active instances inside
``[freeness_low, freeness_high]``: below the band for ``scale_out_ticks``
ticks in a row it starts an instance, above it for ``scale_in_ticks`` it
drains the instance cheapest to empty (its requests migrate away, then it
stops). A cooldown follows every change. With ``min_instances = 0`` it
scales to zero after ``idle_timeout_s`` without requests, and starts
instances again as soon as gateways hold requests for lack of one.
``static`` keeps exactly ``min_instances`` (the provisioned baseline).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from autoscaler.decisions import Decision, Drain, ScaleOut, Stop
from autoscaler.policies.forecast import HoltState
from autoscaler.snapshot import InstanceState, Snapshot
from infra.registry import Registry


@dataclass(frozen=True)
class ScalingConfig:
    """The scaling policies' knobs. Each field of ``AutoscalerSettings``
    (``SHOAL_<NAME>``, ``shoal autoscaler --name``) with the same name sets it
    (``autoscaler.main.controller_config``); the defaults are the same."""

    min_instances: int = 1
    """Never fewer active or starting instances (0 allows scale to zero)."""
    max_instances: int = 4
    """Never more instances, starting ones included."""
    freeness_low: float = 10.0
    """Scale out while the average freeness (free blocks per running request)
    stays below this."""
    freeness_high: float = 60.0
    """Scale in while it stays above this."""
    scale_out_ticks: int = 3
    """Consecutive ticks below the band (or with requests held) before scaling out."""
    scale_in_ticks: int = 10
    """Consecutive ticks above the band before draining an instance."""
    cooldown_s: float = 10.0
    """No scaling change for this long after the previous one."""
    idle_timeout_s: float = 60.0
    """With ``min_instances = 0``: stop every instance after this long without
    requests."""
    start_timeout_s: float = 600.0
    """An instance still starting this long after its launch is stopped
    (:func:`autoscaler.policies.tick.start_timeouts`); the floor then starts
    another."""
    # -- the ``slo`` policy (autoscaler.policies.slo) --
    slo_ttft_high_s: float = 1.0
    """TTFT P99 target of high-priority requests."""
    slo_ttft_normal_s: float = 5.0
    """TTFT P99 target of normal-priority requests."""
    slo_ttft_low_s: float = 30.0
    """TTFT P99 target of low-priority requests."""
    slo_tpot_high_s: float = 0.2
    """TPOT P99 target (seconds per output token after the first), high priority."""
    slo_tpot_normal_s: float = 0.5
    """TPOT P99 target, normal priority."""
    slo_tpot_low_s: float = 2.0
    """TPOT P99 target, low priority."""
    slo_min_samples: int = 20
    """A priority's P99 is compared with its target only over this many requests."""
    forecast_interval_s: float = 5.0
    """The forecasters take one observation of the rates this often (the
    gateways' rate window: non-overlapping samples)."""
    forecast_z: float = 2.0
    """Headroom: the fleet is sized for the forecast plus this many standard
    deviations of its error."""
    assumed_cold_start_s: float = 30.0
    """Cold start assumed until the policy has seen an instance become ready."""
    panic_window_s: float = 60.0
    """After an SLO breach or held requests: no scale in for this long."""
    panic_scale: float = 1.5
    """In a breach, at least this many times the active instances (once per cold start)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise ValueError(
                f"need 0 <= min_instances ({self.min_instances}) <= max_instances "
                f"({self.max_instances}) and max_instances >= 1"
            )
        targets = (self.slo_ttft_high_s, self.slo_ttft_normal_s, self.slo_ttft_low_s,
                   self.slo_tpot_high_s, self.slo_tpot_normal_s, self.slo_tpot_low_s)  # fmt: skip
        if (
            min(targets) <= 0
            or self.forecast_interval_s <= 0
            or self.assumed_cold_start_s < 0
            or self.panic_scale < 1
        ):
            raise ValueError("SLO targets must be > 0, assumed_cold_start_s >= 0, panic_scale >= 1")
        if self.freeness_low >= self.freeness_high:
            raise ValueError(
                f"freeness_low ({self.freeness_low}) must be below freeness_high "
                f"({self.freeness_high})"
            )


@dataclass(frozen=True)
class ScalingState:
    """What a scaling policy carries from tick to tick (serialisable)."""

    num_low_ticks: int = 0
    """Consecutive ticks below the band (or with requests held)."""
    num_high_ticks: int = 0
    """Consecutive ticks above the band."""
    last_change_s: float = -math.inf
    """When the last scale-out or drain was decided (the snapshot's clock)."""
    idle_since_s: float | None = None
    """Since when no active instance has had a request (None: busy)."""
    # -- what the ``slo`` policy learns and carries --
    arrivals: HoltState = field(default_factory=HoltState)
    """Forecaster of the arrival rate (requests/s)."""
    tokens: HoltState = field(default_factory=HoltState)
    """Forecaster of the token rate (prompt + requested output tokens/s)."""
    last_observed_s: float = -math.inf
    """When the forecasters last took an observation."""
    rps_per_instance: float | None = None
    """Learned: requests/s one instance takes at the band's middle."""
    tps_per_instance: float | None = None
    """Learned: tokens/s one instance takes at the band's middle."""
    cold_start_s: float | None = None
    """Learned: the last observed launch-to-active time."""
    starting: tuple[tuple[str, float], ...] = ()
    """Instances starting at the previous tick, with their launch times."""
    last_tick_s: float | None = None
    """The previous tick's clock."""
    tick_s: float | None = None
    """Learned: the interval between ticks (smoothed)."""
    panic_until_s: float = -math.inf
    """No scale in before this (an SLO breach or held requests)."""
    last_panic_s: float = -math.inf
    """When the last breach-driven scale-out was decided."""
    num_queue_growth_ticks: int = 0
    """Consecutive ticks with more requests waiting than the tick before."""
    num_waiting: int = 0
    """Requests waiting on the active instances at the previous tick."""
    target: int | None = None
    """The instance count the last tick aimed for (shown by ``shoal status``)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScalingState:
        values = dict(data)
        values["arrivals"] = HoltState.from_json(values["arrivals"])
        values["tokens"] = HoltState.from_json(values["tokens"])
        values["starting"] = tuple((str(i), float(t)) for i, t in values["starting"])
        return cls(**values)


ScalingPolicy = Callable[
    [Snapshot, ScalingConfig, ScalingState], tuple[list[Decision], ScalingState]
]
SCALING: Registry[ScalingPolicy] = Registry("scaling policy")


def cheapest_to_empty(candidates: list[InstanceState]) -> InstanceState:
    """Fewest high-priority requests, then fewest requests, then least KV."""
    return min(
        candidates, key=lambda i: (i.num_high, i.num_requests, i.usage_fraction, i.instance_id)
    )


def stops(snap: Snapshot) -> list[Decision]:
    return [
        Stop(i.instance_id, "drained: no requests left")
        for i in snap.draining
        if i.num_requests == 0 and i.instance_id not in snap.migrating
    ]


def floor(snap: Snapshot, cfg: ScalingConfig) -> list[Decision]:
    live = len(snap.active) + len(snap.starting)
    if live == 0 and snap.num_held > 0:
        return [
            ScaleOut(max(1, cfg.min_instances), f"{snap.num_held} request(s) held with no instance")
        ]
    if live < cfg.min_instances:
        return [
            ScaleOut(
                cfg.min_instances - live,
                f"{live} instance(s), below min_instances={cfg.min_instances}",
            )
        ]
    return []


def band_demand(active: list[InstanceState], cfg: ScalingConfig) -> float:
    """Instances (like the active ones, fractional) whose average freeness
    would sit in the middle of the band under today's load: N such that
    (N * blocks_per_instance - usage) / batch = target."""
    loads = [i.load for i in active if i.load is not None]
    if not loads:
        return float(len(active))
    usage = sum(load.virtual_usage for load in loads)
    batch = sum(load.num_running + load.num_waiting for load in loads)
    per_instance = statistics.fmean(load.num_blocks_total for load in loads)
    target = (cfg.freeness_low + cfg.freeness_high) / 2
    return (target * batch + usage) / per_instance


def instances_for_band(active: list[InstanceState], cfg: ScalingConfig) -> int:
    """:func:`band_demand`, in whole instances."""
    return math.ceil(band_demand(active, cfg))


def projected_freeness(snap: Snapshot, leaving: InstanceState) -> float:
    """Average freeness if ``leaving``'s requests moved onto the others."""
    rest = [i for i in snap.active if i is not leaving]
    free = sum(i.load.num_blocks_total - i.load.virtual_usage for i in rest if i.load)
    moved = leaving.load.virtual_usage if leaving.load else 0.0
    batch = sum(i.num_requests for i in snap.active)
    return math.inf if batch == 0 else (free - moved) / batch


Step = tuple[list[Decision], ScalingState]
"""A scaling policy's answer: the decisions and the state for the next tick."""


@SCALING.register("band", default=True)
def freeness_band(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> Step:
    """Keep the average freeness of active instances inside the band.

    Drained instances stop and the floor holds first; then at most one of:
    scale out, scale to zero, scale in (drain one instance)."""
    decisions = stops(snap) + floor(snap, cfg)
    if any(isinstance(d, ScaleOut) for d in decisions):
        return decisions, replace(state, num_low_ticks=0, last_change_s=snap.now)
    if not snap.active:
        return decisions, replace(state, num_low_ticks=0, num_high_ticks=0, idle_since_s=None)
    avg = statistics.fmean(i.freeness for i in snap.active)
    state = _count_ticks(snap, cfg, state, avg)
    cooling = snap.now - state.last_change_s < cfg.cooldown_s
    if (out := _scale_out(snap, cfg, state, avg, cooling)) is not None:
        return [*decisions, out], replace(state, num_low_ticks=0, last_change_s=snap.now)
    state = track_idle(snap, state)
    if drains := scale_to_zero(snap, cfg, state):
        return [*decisions, *drains], replace(state, idle_since_s=None, last_change_s=snap.now)
    if (drain := _scale_in(snap, cfg, state, avg, cooling)) is not None:
        return [*decisions, drain], replace(state, num_high_ticks=0, last_change_s=snap.now)
    return decisions, state


def _count_ticks(
    snap: Snapshot, cfg: ScalingConfig, state: ScalingState, avg: float
) -> ScalingState:
    """Extend or reset the runs of ticks below and above the band."""
    short = avg < cfg.freeness_low or snap.num_held > 0
    return replace(
        state,
        num_low_ticks=state.num_low_ticks + 1 if short else 0,
        num_high_ticks=state.num_high_ticks + 1 if avg > cfg.freeness_high else 0,
    )


def _scale_out(
    snap: Snapshot, cfg: ScalingConfig, state: ScalingState, avg: float, cooling: bool
) -> ScaleOut | None:
    """Below the band long enough, nothing starting, room below the maximum:
    as many instances as bring the average to the band's middle."""
    live = len(snap.active) + len(snap.starting)
    if (
        state.num_low_ticks < cfg.scale_out_ticks
        or cooling
        or snap.starting
        or live >= cfg.max_instances
    ):
        return None
    count = min(instances_for_band(snap.active, cfg) - live, cfg.max_instances - live)
    reason = (
        f"average freeness {avg:.1f} below {cfg.freeness_low:g} for "
        f"{state.num_low_ticks} ticks, {snap.num_held} held"
    )
    return ScaleOut(max(1, count), reason)


def track_idle(snap: Snapshot, state: ScalingState) -> ScalingState:
    """Start (or keep) the idle clock while nothing runs or is held."""
    idle = all(i.num_requests == 0 for i in snap.active) and snap.num_held == 0
    return replace(state, idle_since_s=(state.idle_since_s or snap.now) if idle else None)


def scale_to_zero(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> list[Decision]:
    """With ``min_instances = 0``, idle for ``idle_timeout_s``: drain them all."""
    if cfg.min_instances != 0 or state.idle_since_s is None:
        return []
    idle_for = snap.now - state.idle_since_s
    if idle_for < cfg.idle_timeout_s:
        return []
    return [Drain(i.instance_id, f"idle for {idle_for:.0f}s: scaling to zero") for i in snap.active]


def _scale_in(
    snap: Snapshot, cfg: ScalingConfig, state: ScalingState, avg: float, cooling: bool
) -> Drain | None:
    """Above the band long enough, none draining, more than the floor: drain
    the instance cheapest to empty if the others stay above the band's bottom."""
    if (
        state.num_high_ticks < cfg.scale_in_ticks
        or cooling
        or snap.draining
        or len(snap.active) <= max(cfg.min_instances, 1)
    ):
        return None
    victim = cheapest_to_empty(snap.active)
    after = projected_freeness(snap, victim)
    if after <= cfg.freeness_low:
        return None
    reason = (
        f"average freeness {avg:.1f} above {cfg.freeness_high:g} for "
        f"{state.num_high_ticks} ticks; {after:.1f} without it"
    )
    return Drain(victim.instance_id, reason)


@SCALING.register("static")
def static(snap: Snapshot, cfg: ScalingConfig, state: ScalingState) -> Step:
    """Exactly ``min_instances``, always (provisioned for the peak)."""
    return stops(snap) + floor(snap, cfg), state

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
from dataclasses import dataclass, replace

from autoscaler.decisions import Decision, Drain, ScaleOut, Stop
from autoscaler.snapshot import InstanceState, Snapshot
from infra.registry import Registry


@dataclass(frozen=True)
class ScalingConfig:
    min_instances: int = 1
    """Never fewer active or starting instances (0 allows scale to zero)."""
    max_instances: int = 4
    freeness_low: float = 10.0
    """Scale out while the average freeness (free blocks per running request)
    stays below this."""
    freeness_high: float = 60.0
    """Scale in while it stays above this."""
    scale_out_ticks: int = 3
    scale_in_ticks: int = 10
    cooldown_s: float = 10.0
    """No scaling change for this long after the previous one."""
    idle_timeout_s: float = 60.0
    """With ``min_instances = 0``: stop every instance after this long without
    requests."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise ValueError(
                f"need 0 <= min_instances ({self.min_instances}) <= max_instances "
                f"({self.max_instances}) and max_instances >= 1"
            )
        if self.freeness_low >= self.freeness_high:
            raise ValueError(
                f"freeness_low ({self.freeness_low}) must be below freeness_high "
                f"({self.freeness_high})"
            )


@dataclass(frozen=True)
class ScalingState:
    """What a scaling policy carries from tick to tick (serialisable)."""

    num_low_ticks: int = 0
    num_high_ticks: int = 0
    last_change_s: float = -math.inf
    idle_since_s: float | None = None


ScalingPolicy = Callable[
    [Snapshot, ScalingConfig, ScalingState], tuple[list[Decision], ScalingState]
]
SCALING: Registry[ScalingPolicy] = Registry("scaling policy")


def cheapest_to_empty(candidates: list[InstanceState]) -> InstanceState:
    """Fewest high-priority requests, then fewest requests, then least KV."""
    return min(
        candidates, key=lambda i: (i.num_high, i.num_requests, i.usage_fraction, i.instance_id)
    )


def _stops(snap: Snapshot) -> list[Decision]:
    return [
        Stop(i.instance_id, "drained: no requests left")
        for i in snap.draining
        if i.num_requests == 0 and i.instance_id not in snap.migrating
    ]


def _floor(snap: Snapshot, cfg: ScalingConfig) -> list[Decision]:
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


def instances_for_band(active: list[InstanceState], cfg: ScalingConfig) -> int:
    """Instances (like the active ones) whose average freeness would sit in
    the middle of the band under today's load: N such that
    (N * blocks_per_instance - usage) / batch = target."""
    loads = [i.load for i in active if i.load is not None]
    if not loads:
        return len(active)
    usage = sum(load.virtual_usage for load in loads)
    batch = sum(load.num_running + load.num_waiting for load in loads)
    per_instance = statistics.fmean(load.num_blocks_total for load in loads)
    target = (cfg.freeness_low + cfg.freeness_high) / 2
    return math.ceil((target * batch + usage) / per_instance)


def _projected_freeness(snap: Snapshot, leaving: InstanceState) -> float:
    """Average freeness if ``leaving``'s requests moved onto the others."""
    rest = [i for i in snap.active if i is not leaving]
    free = sum(i.load.num_blocks_total - i.load.virtual_usage for i in rest if i.load)
    moved = leaving.load.virtual_usage if leaving.load else 0.0
    batch = sum(i.num_requests for i in snap.active)
    return math.inf if batch == 0 else (free - moved) / batch


@SCALING.register("band", default=True)
def freeness_band(
    snap: Snapshot, cfg: ScalingConfig, state: ScalingState
) -> tuple[list[Decision], ScalingState]:
    decisions = _stops(snap) + _floor(snap, cfg)
    if decisions and any(isinstance(d, ScaleOut) for d in decisions):
        return decisions, replace(state, num_low_ticks=0, last_change_s=snap.now)
    active = snap.active
    if not active:
        return decisions, replace(state, num_low_ticks=0, num_high_ticks=0, idle_since_s=None)
    avg = statistics.fmean(i.freeness for i in active)
    short = avg < cfg.freeness_low or snap.num_held > 0
    state = replace(
        state,
        num_low_ticks=state.num_low_ticks + 1 if short else 0,
        num_high_ticks=state.num_high_ticks + 1 if avg > cfg.freeness_high else 0,
    )
    cooling = snap.now - state.last_change_s < cfg.cooldown_s
    live = len(active) + len(snap.starting)
    if (
        state.num_low_ticks >= cfg.scale_out_ticks
        and not cooling
        and not snap.starting
        and live < cfg.max_instances
    ):
        count = min(instances_for_band(active, cfg) - live, cfg.max_instances - live)
        reason = (
            f"average freeness {avg:.1f} below {cfg.freeness_low:g} for "
            f"{state.num_low_ticks} ticks, {snap.num_held} held"
        )
        return [*decisions, ScaleOut(max(1, count), reason)], replace(
            state, num_low_ticks=0, last_change_s=snap.now
        )
    idle = all(i.num_requests == 0 for i in active) and snap.num_held == 0
    state = replace(state, idle_since_s=(state.idle_since_s or snap.now) if idle else None)
    if (
        cfg.min_instances == 0
        and state.idle_since_s is not None
        and snap.now - state.idle_since_s >= cfg.idle_timeout_s
    ):
        idle_for = snap.now - state.idle_since_s
        drains = [
            Drain(i.instance_id, f"idle for {idle_for:.0f}s: scaling to zero") for i in active
        ]
        return [*decisions, *drains], replace(state, idle_since_s=None, last_change_s=snap.now)
    floor = max(cfg.min_instances, 1)
    if (
        state.num_high_ticks >= cfg.scale_in_ticks
        and not cooling
        and not snap.draining
        and len(active) > floor
    ):
        victim = cheapest_to_empty(active)
        after = _projected_freeness(snap, victim)
        if after > cfg.freeness_low:
            reason = (
                f"average freeness {avg:.1f} above {cfg.freeness_high:g} for "
                f"{state.num_high_ticks} ticks; {after:.1f} without it"
            )
            return [*decisions, Drain(victim.instance_id, reason)], replace(
                state, num_high_ticks=0, last_change_s=snap.now
            )
    return decisions, state


@SCALING.register("static")
def static(
    snap: Snapshot, cfg: ScalingConfig, state: ScalingState
) -> tuple[list[Decision], ScalingState]:
    """Exactly ``min_instances``, always (provisioned for the peak)."""
    return _stops(snap) + _floor(snap, cfg), state

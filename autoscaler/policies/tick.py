"""One tick's decisions, composed the same way by the controller and by the
simulator (``bench.simulator.cluster``): first the start timeouts, then the
scaling policy and the pairing policy over the instances that remain."""

from __future__ import annotations

from dataclasses import dataclass, replace

from autoscaler.decisions import Decision, StopStarting
from autoscaler.policies.pairing import PairingConfig, PairingPolicy
from autoscaler.policies.scaling import ScalingConfig, ScalingPolicy, ScalingState
from autoscaler.snapshot import Snapshot


@dataclass(frozen=True)
class TickPolicies:
    """The policies a tick asks, with their configs."""

    scaling: ScalingPolicy
    """A registered scaling policy (``SCALING.get(name)``)."""
    scaling_config: ScalingConfig
    """Its knobs, ``start_timeout_s`` among them."""
    pairing: PairingPolicy | None
    """A registered pairing policy; None: nothing migrates (the simulator's
    ``migration=False``)."""
    pairing_config: PairingConfig
    """Its knobs."""


def start_timeouts(snap: Snapshot, cfg: ScalingConfig) -> list[StopStarting]:
    """Instances still starting ``start_timeout_s`` after their launch."""
    return [
        StopStarting(
            i.instance_id,
            f"not ready after {snap.now - i.started_at:.0f}s "
            f"(start_timeout_s={cfg.start_timeout_s:g})",
        )
        for i in snap.starting
        if snap.now - i.started_at > cfg.start_timeout_s
    ]


def decide(
    snap: Snapshot, policies: TickPolicies, state: ScalingState
) -> tuple[list[Decision], ScalingState]:
    """Start timeouts first; the policies then see the cluster without those
    instances (so the floor replaces them at once)."""
    timeouts = start_timeouts(snap, policies.scaling_config)
    if timeouts:
        gone = {d.instance_id for d in timeouts}
        snap = replace(
            snap, instances=tuple(i for i in snap.instances if i.instance_id not in gone)
        )
    decisions, state = policies.scaling(snap, policies.scaling_config, state)
    if policies.pairing is not None:
        decisions = [*decisions, *policies.pairing(snap, policies.pairing_config)]
    return [*timeouts, *decisions], state

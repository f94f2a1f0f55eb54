"""The autoscaler's policies, pure and registered by name: scaling (how many
instances, which to drain: ``band``, ``static``, and ``slo`` with its
forecaster) and pairing (which migrations balance, drain and protect
high-priority traffic), composed into one tick by :func:`decide`
(start timeouts first). Request selection on a source lives in
:mod:`migration.policies`."""

from autoscaler.policies.pairing import PAIRING, PairingConfig, may_move_high
from autoscaler.policies.scaling import SCALING, ScalingConfig, ScalingState
from autoscaler.policies.slo import Plan, plan
from autoscaler.policies.tick import TickPolicies, decide, start_timeouts

__all__ = [
    "PAIRING",
    "SCALING",
    "PairingConfig",
    "Plan",
    "ScalingConfig",
    "ScalingState",
    "TickPolicies",
    "decide",
    "may_move_high",
    "plan",
    "start_timeouts",
]

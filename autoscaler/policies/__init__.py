"""The autoscaler's policies, pure and registered by name: scaling (how many
instances, which to drain) and pairing (which migrations balance, drain and
protect high-priority traffic). Request selection on a source lives in
:mod:`migration.policies`."""

from autoscaler.policies.pairing import (
    PairingConfig,
    pairing_policies,
    pairing_policy_named,
)
from autoscaler.policies.scaling import (
    ScalingConfig,
    ScalingState,
    scaling_policies,
    scaling_policy_named,
)

__all__ = [
    "PairingConfig",
    "ScalingConfig",
    "ScalingState",
    "pairing_policies",
    "pairing_policy_named",
    "scaling_policies",
    "scaling_policy_named",
]

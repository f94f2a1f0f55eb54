"""The autoscaler's policies, pure and registered by name: scaling (how many
instances, which to drain) and pairing (which migrations balance, drain and
protect high-priority traffic). Request selection on a source lives in
:mod:`migration.policies`."""

from autoscaler.policies.pairing import PAIRING, PairingConfig
from autoscaler.policies.scaling import SCALING, ScalingConfig, ScalingState

__all__ = ["PAIRING", "SCALING", "PairingConfig", "ScalingConfig", "ScalingState"]

"""Dispatch policies: pure functions of a snapshot that rank candidate
instances for one request. Registered by name; ``llumnix`` is the default."""

from gateway.policies.base import (
    DISPATCH,
    Candidate,
    DispatchContext,
    DispatchPolicy,
    DispatchRequest,
    make_policy,
)
from gateway.policies.baselines import LeastLoad, Random, RoundRobin
from gateway.policies.llumnix import Llumnix

__all__ = [
    "DISPATCH",
    "Candidate",
    "DispatchContext",
    "DispatchPolicy",
    "DispatchRequest",
    "LeastLoad",
    "Llumnix",
    "Random",
    "RoundRobin",
    "make_policy",
]

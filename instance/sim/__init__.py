"""Simulated engine: paged KV blocks, continuous batching, priority queue,
preemption and a per-step latency model, driven by an explicit step API; KV
transfer for live migration with a bandwidth model."""

from instance.sim.core import SimConfig, SimCore, SimStep
from instance.sim.kv import KvTransferModel, SimKvOptions, SimKvPort
from instance.sim.latency import LatencyModel

__all__ = [
    "KvTransferModel",
    "LatencyModel",
    "SimConfig",
    "SimCore",
    "SimKvOptions",
    "SimKvPort",
    "SimStep",
]

"""Simulated engine: paged KV blocks, continuous batching, priority queue,
preemption and a per-step latency model, driven by an explicit step API."""

from instance.sim.core import SimConfig, SimCore, SimStep
from instance.sim.latency import LatencyModel

__all__ = ["LatencyModel", "SimConfig", "SimCore", "SimStep"]

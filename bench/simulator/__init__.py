"""The cluster simulator (``shoal bench simulate``): N simulated instances in
virtual time, driven by the live system's dispatch, scaling, pairing and
request-selection policies, the sim engine's paged-KV model and a latency
model of LLaMA-7B on one A10. See docs/SIMULATOR.md.

    from bench.simulator import simulate
    from bench.simulator.config import SimulationConfig

    result = simulate(trace.requests, SimulationConfig(num_instances=16))
    print(result.render())

Modules: ``hardware`` (presets), ``config``, ``cluster`` (the event loop,
dispatch, ticks), ``instance``, ``migration``, ``requests``, ``events``,
``results``, ``cli``, ``perf``. This package imports nothing heavy, so
``shoal`` starts fast; the simulator loads with the first :func:`simulate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.simulator.config import SimulationConfig
    from bench.simulator.results import SimulationResult
    from bench.traces import TraceRequest


def simulate(trace: Sequence[TraceRequest], config: SimulationConfig) -> SimulationResult:
    """Run ``trace`` through a simulated cluster; deterministic for equal inputs."""
    from bench.simulator.cluster import Simulator

    return Simulator(trace, config).run()


__all__ = ["simulate"]

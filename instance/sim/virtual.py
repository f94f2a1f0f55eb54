"""Run ``SimCore`` in virtual time: the same scheduler the worker runs, with a
clock that jumps from step to step and to the next arrival."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from instance.engine import EngineRequest
from instance.sim.core import SimCore


@dataclass
class VirtualRun:
    """What a virtual-time run produced."""

    end_time_s: float = 0.0
    batches: list[tuple[str, ...]] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    first_token_s: dict[str, float] = field(default_factory=dict)
    finish_s: dict[str, float] = field(default_factory=dict)


def run_virtual(
    core: SimCore, arrivals: Iterable[EngineRequest], *, max_steps: int = 1_000_000
) -> VirtualRun:
    """Feed requests at their ``arrival_time`` and step until all finish."""
    pending = sorted(arrivals, key=lambda r: r.arrival_time)
    run = VirtualRun()
    now = 0.0
    for _ in range(max_steps):
        while pending and pending[0].arrival_time <= now:
            core.add(pending.pop(0))
        if not core.has_work:
            if not pending:
                break
            now = pending[0].arrival_time
            continue
        step = core.step()
        now += step.duration_s
        run.batches.append(step.batch)
        for out in step.outputs:
            run.tokens.setdefault(out.request_id, []).append(out.token_id)
            run.first_token_s.setdefault(out.request_id, now)
            if out.finish_reason is not None:
                run.finish_s[out.request_id] = now
    else:
        raise RuntimeError(f"virtual run did not finish within {max_steps} steps")
    run.end_time_s = now
    return run

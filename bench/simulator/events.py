"""The virtual clock: a heap of timed callbacks, run in time order (ties in
the order they were scheduled, so a run is deterministic)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Callback = Callable[[float], None]
"""Called with the virtual time it was scheduled for."""


class SimulationStuck(RuntimeError):
    """The run needed more events than allowed (a livelock in the model)."""


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.num_events = 0

    def at(self, time_s: float, callback: Callback) -> None:
        """Run ``callback(time_s)`` at ``time_s`` (never before now)."""
        assert time_s >= self.now, (time_s, self.now)
        heapq.heappush(self._heap, (time_s, next(self._seq), callback))

    def run(self, done: Callable[[], bool], max_events: int) -> None:
        """Run events in time order until ``done()`` or none are left."""
        heap, pop = self._heap, heapq.heappop
        while heap and not done():
            if self.num_events >= max_events:
                raise SimulationStuck(f"{max_events} events at t={self.now:.1f}s, not done")
            time_s, _, callback = pop(heap)
            self.now = time_s
            self.num_events += 1
            callback(time_s)

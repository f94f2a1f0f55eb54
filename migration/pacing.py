"""Pacing of a source's KV copies: a bound on the bytes per second it serves.

The copy competes with the source's decoding for memory bandwidth (and, on
CPU, for cores), so an unbounded copy slows the requests that stay there.
The bound is a virtual link of ``bytes_per_s`` shared by every read the
source serves: each chunk is sent when the link would be free, so over any
interval the copies average at most the bound. The rule is pure (an
injected clock); the caller sleeps the returned delay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    def __init__(self, bytes_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if bytes_per_s < 0:
            raise ValueError(f"bytes_per_s must be >= 0, got {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self._clock = clock
        self._free_at = 0.0
        self._lock = threading.Lock()

    @property
    def bounded(self) -> bool:
        return self.bytes_per_s > 0

    def delay(self, nbytes: int) -> float:
        """Seconds to wait before sending ``nbytes`` (0 when unbounded);
        the link is taken for them from then on."""
        if not self.bounded:
            return 0.0
        with self._lock:
            now = self._clock()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.bytes_per_s
            return start - now

    def pace(self, nbytes: int, sleep: Callable[[float], None] = time.sleep) -> None:
        wait = self.delay(nbytes)
        if wait > 0:
            sleep(wait)

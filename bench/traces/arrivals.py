"""Arrival processes: when each request of a trace is sent.

Every process yields non-decreasing times in seconds from the start of the
trace; the first request arrives at 0. Poisson arrivals have exponential gaps
(coefficient of variation 1); Gamma gaps with the same mean and a larger CV
give the bursty traffic of the Llumnix evaluation (CV 2-8); a replay sends
requests at given timestamps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol


class ArrivalError(ValueError):
    """Arrival parameters that describe no process."""


class ArrivalProcess(Protocol):
    @property
    def kind(self) -> str: ...

    def times(self, rng: random.Random, n: int) -> list[float]:
        """Arrival times of ``n`` requests, the first at 0."""
        ...

    def params(self) -> dict[str, Any]:
        """JSON parameters, recorded in the trace header."""
        ...

    @property
    def expected_rate(self) -> float | None:
        """Mean requests per second, where the process defines one."""
        ...

    @property
    def expected_cv(self) -> float | None:
        """Coefficient of variation of the gaps, where defined."""
        ...


def _from_gaps(gaps: list[float]) -> list[float]:
    out, t = [0.0], 0.0
    for gap in gaps:
        t += gap
        out.append(t)
    return out


@dataclass(frozen=True)
class Poisson:
    """Independent exponential gaps at ``rate`` requests per second."""

    rate: float
    kind: ClassVar[str] = "poisson"

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ArrivalError(f"poisson: rate must be > 0 (got {self.rate})")

    def times(self, rng: random.Random, n: int) -> list[float]:
        return _from_gaps([rng.expovariate(self.rate) for _ in range(n - 1)])[:n]

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "rate": self.rate}

    @property
    def expected_rate(self) -> float:
        return self.rate

    @property
    def expected_cv(self) -> float:
        return 1.0


@dataclass(frozen=True)
class Gamma:
    """Gamma-distributed gaps with mean ``1 / rate`` and coefficient of
    variation ``cv`` (shape ``1 / cv**2``): cv 1 is Poisson, larger is burstier."""

    rate: float
    cv: float
    kind: ClassVar[str] = "gamma"

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.cv > 0):
            raise ArrivalError(f"gamma: rate and cv must be > 0 (rate={self.rate}, cv={self.cv})")

    def times(self, rng: random.Random, n: int) -> list[float]:
        shape = 1.0 / self.cv**2
        scale = 1.0 / (self.rate * shape)
        return _from_gaps([rng.gammavariate(shape, scale) for _ in range(n - 1)])[:n]

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "rate": self.rate, "cv": self.cv}

    @property
    def expected_rate(self) -> float:
        return self.rate

    @property
    def expected_cv(self) -> float:
        return self.cv


@dataclass(frozen=True)
class Replay:
    """Fixed timestamps (seconds), shifted so the first is 0."""

    timestamps: tuple[float, ...]
    source: str = ""
    """Where the timestamps came from (recorded in the header)."""
    kind: ClassVar[str] = "replay"

    def __post_init__(self) -> None:
        if not self.timestamps:
            raise ArrivalError("replay: no timestamps")
        if any(b < a for a, b in zip(self.timestamps, self.timestamps[1:], strict=False)):
            raise ArrivalError("replay: timestamps must be non-decreasing")

    def times(self, rng: random.Random, n: int) -> list[float]:
        if n > len(self.timestamps):
            raise ArrivalError(f"replay: {n} requests asked, {len(self.timestamps)} timestamps")
        first = self.timestamps[0]
        return [t - first for t in self.timestamps[:n]]

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "num_timestamps": len(self.timestamps)}

    @property
    def expected_rate(self) -> None:
        return None

    @property
    def expected_cv(self) -> None:
        return None

    @classmethod
    def from_file(cls, path: Path) -> Replay:
        """One timestamp per line; blank lines and ``#`` comments are skipped."""
        values: list[float] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                values.append(float(text))
            except ValueError:
                raise ArrivalError(f"{path}:{number}: not a number: {text!r}") from None
        return cls(tuple(values), source=str(path))


ARRIVAL_KINDS = ("poisson", "gamma", "replay")
DEFAULT_ARRIVALS = "poisson"


def arrival_process(
    kind: str, *, rate: float | None = None, cv: float | None = None, timestamps: Path | None = None
) -> ArrivalProcess:
    """The process ``kind`` with its parameters (a typed error names what is missing)."""
    if kind == "poisson":
        if rate is None:
            raise ArrivalError("poisson arrivals need a rate")
        return Poisson(rate)
    if kind == "gamma":
        if rate is None or cv is None:
            raise ArrivalError("gamma arrivals need a rate and a cv")
        return Gamma(rate, cv)
    if kind == "replay":
        if timestamps is None:
            raise ArrivalError("replay arrivals need a timestamps file")
        return Replay.from_file(timestamps)
    raise ArrivalError(f"unknown arrivals {kind!r} (known: {', '.join(ARRIVAL_KINDS)})")

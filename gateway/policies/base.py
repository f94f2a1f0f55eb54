"""The dispatch-policy interface and its registry."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from infra.records import InstanceInfo, LoadReport, Priority
from infra.registry import Registry


@dataclass(frozen=True)
class Candidate:
    """An active instance serving the requested model, as the gateway sees it."""

    info: InstanceInfo
    """Its registry entry (address, model, block size, ...)."""
    load: LoadReport
    """Its latest load report."""
    num_reserved: int = 0
    """Requests dispatched to it (by any gateway) not yet seen in its report."""

    @property
    def instance_id(self) -> str:
        return self.info.instance_id


@dataclass(frozen=True)
class DispatchRequest:
    """What a policy knows of the request being dispatched."""

    priority: Priority
    """The request's effective priority."""
    num_prompt_tokens: int
    """Estimate of the prompt length (the gateway does not tokenise)."""


@dataclass
class DispatchContext:
    """Everything a policy may look at: one request and a snapshot."""

    request: DispatchRequest
    """The request being dispatched."""
    candidates: Sequence[Candidate]
    """The instances it may go to (never empty when the gateway asks)."""
    tick: int = 0
    """Requests dispatched so far by this gateway (for rotation)."""
    rng: random.Random = field(default_factory=random.Random)
    """The randomness a policy may use (seeded in the simulator)."""


class DispatchPolicy(ABC):
    """Ranks candidates, best first. Never does I/O."""

    name: ClassVar[str]

    def __init_subclass__(cls, *, name: str, default: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        DISPATCH.register(name, default=default)(cls)

    @abstractmethod
    def rank(self, ctx: DispatchContext) -> list[Candidate]: ...


DISPATCH: Registry[type[DispatchPolicy]] = Registry("dispatch policy")


def make_policy(name: str | None = None) -> DispatchPolicy:
    """A fresh instance of the dispatch policy ``name`` (None: the default)."""
    return DISPATCH.get(name)()

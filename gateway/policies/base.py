"""The dispatch-policy interface and its registry."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from infra.records import InstanceInfo, LoadReport, Priority


@dataclass(frozen=True)
class Candidate:
    """An active instance serving the requested model, as the gateway sees it."""

    info: InstanceInfo
    load: LoadReport
    num_reserved: int = 0
    """Requests dispatched to it (by any gateway) not yet seen in its report."""

    @property
    def instance_id(self) -> str:
        return self.info.instance_id


@dataclass(frozen=True)
class DispatchRequest:
    priority: Priority
    num_prompt_tokens: int
    """Estimate of the prompt length (the gateway does not tokenise)."""


@dataclass
class DispatchContext:
    """Everything a policy may look at: one request and a snapshot."""

    request: DispatchRequest
    candidates: Sequence[Candidate]
    tick: int = 0
    """Requests dispatched so far by this gateway (for rotation)."""
    rng: random.Random = field(default_factory=random.Random)


class DispatchPolicy(ABC):
    """Ranks candidates, best first. Never does I/O."""

    name: ClassVar[str]
    _registry: ClassVar[dict[str, type[DispatchPolicy]]] = {}
    _default: ClassVar[str | None] = None

    def __init_subclass__(cls, *, name: str, default: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name in DispatchPolicy._registry:
            raise TypeError(f"dispatch policy {name!r} registered twice")
        cls.name = name
        DispatchPolicy._registry[name] = cls
        if default:
            DispatchPolicy._default = name

    @abstractmethod
    def rank(self, ctx: DispatchContext) -> list[Candidate]: ...


def policy_names() -> list[str]:
    return sorted(DispatchPolicy._registry)


def default_policy_name() -> str:
    assert DispatchPolicy._default is not None
    return DispatchPolicy._default


def make_policy(name: str | None = None) -> DispatchPolicy:
    name = name or default_policy_name()
    try:
        return DispatchPolicy._registry[name]()
    except KeyError:
        raise ValueError(
            f"unknown dispatch policy {name!r}; choose one of {policy_names()}"
        ) from None

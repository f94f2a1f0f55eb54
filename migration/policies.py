"""Migration policies, pure and registered by name: which running requests
leave a source first, and whether each moves its KV or recomputes it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from infra.records import Priority
from infra.registry import Registry


@dataclass(frozen=True)
class Movable:
    """A running request as a selection policy sees it."""

    request_id: str
    priority: Priority
    arrival_time: float
    num_tokens: int
    """Context so far (prompt and output)."""
    num_remaining: int
    """Tokens it may still generate."""


SelectionPolicy = Callable[[Sequence[Movable]], list[Movable]]
"""Orders candidates, first to move first."""

SELECTION: Registry[SelectionPolicy] = Registry("selection policy")


@SELECTION.register("lcfs", default=True)
def last_come_first(candidates: Sequence[Movable]) -> list[Movable]:
    """Newest first: the least context to move (Llumnix's default)."""
    return sorted(candidates, key=lambda m: -m.arrival_time)


@SELECTION.register("shortest-remaining")
def shortest_remaining(candidates: Sequence[Movable]) -> list[Movable]:
    """Fewest tokens still to generate first."""
    return sorted(candidates, key=lambda m: (m.num_remaining, -m.arrival_time))


@SELECTION.register("lowest-priority")
def lowest_priority(candidates: Sequence[Movable]) -> list[Movable]:
    """Low priority first, then newest."""
    return sorted(candidates, key=lambda m: (-m.priority.rank, -m.arrival_time))


def select(
    name: str | None, candidates: Sequence[Movable], count: int, *, include_high: bool = False
) -> list[Movable]:
    """Up to ``count`` requests to move (policy ``name``, None for the
    default); high priority only when asked."""
    policy = SELECTION.get(name)
    allowed = [m for m in candidates if include_high or m.priority is not Priority.HIGH]
    return policy(allowed)[:count]


def choose_mode(
    asked: Literal["kv", "recompute", "auto"],
    *,
    kv_available: bool,
    num_tokens: int,
    block_size: int,
    min_kv_blocks: int = 2,
) -> Literal["kv", "recompute"]:
    """KV transfer unless it cannot run (no KV port, or a request that holds
    no KV yet: even when ``kv`` is asked for) or recomputing is cheaper: a
    context shorter than ``min_kv_blocks`` full blocks costs less to prefill
    again than a multi-stage copy's round trips."""
    if asked == "recompute" or not kv_available:
        return "recompute"
    if asked == "kv":
        return "kv"
    return "kv" if (num_tokens - 1) // block_size >= min_kv_blocks else "recompute"

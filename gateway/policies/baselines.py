"""Baseline dispatch policies for benchmarks."""

from __future__ import annotations

from gateway.policies.base import Candidate, DispatchContext, DispatchPolicy


class LeastLoad(DispatchPolicy, name="least-load"):
    """Fewest requests (running + waiting + in flight): INFaaS++-style."""

    def rank(self, ctx: DispatchContext) -> list[Candidate]:
        return sorted(
            ctx.candidates,
            key=lambda c: (c.load.num_running + c.load.num_waiting + c.num_reserved, c.instance_id),
        )


class RoundRobin(DispatchPolicy, name="round-robin"):
    def rank(self, ctx: DispatchContext) -> list[Candidate]:
        ordered = sorted(ctx.candidates, key=lambda c: c.instance_id)
        if not ordered:
            return []
        start = ctx.tick % len(ordered)
        return ordered[start:] + ordered[:start]


class Random(DispatchPolicy, name="random"):
    def rank(self, ctx: DispatchContext) -> list[Candidate]:
        ordered = list(ctx.candidates)
        ctx.rng.shuffle(ordered)
        return ordered

"""Llumnix dispatch: send the request to the freest instance.

Freeness is the instance's reported Llumnix freeness, corrected for requests
already dispatched to it but not yet in its report (in-flight reservations):
each adds the new request's prompt blocks to the usage and one to the batch.
"""

from __future__ import annotations

import math

from gateway.policies.base import Candidate, DispatchContext, DispatchPolicy


def effective_freeness(c: Candidate, prompt_blocks: int) -> float:
    load = c.load
    if math.isinf(load.virtual_usage):
        return -math.inf  # draining
    batch = load.num_running + (1 if load.num_waiting else 0) + c.num_reserved
    if batch == 0:
        return math.inf
    usage = load.virtual_usage + c.num_reserved * prompt_blocks
    return (load.num_blocks_total - usage) / batch


class Llumnix(DispatchPolicy, name="llumnix", default=True):
    def rank(self, ctx: DispatchContext) -> list[Candidate]:
        def key(c: Candidate) -> tuple[float, int, int, str]:
            bs = max(c.info.block_size, 1)
            blocks = -(-ctx.request.num_prompt_tokens // bs)
            f = effective_freeness(c, blocks)
            # Highest freeness first; among equally free (e.g. idle) instances,
            # the one with fewer reservations, then fewer running, then by id.
            return (-f, c.num_reserved, c.load.num_running, c.instance_id)

        return sorted(ctx.candidates, key=key)

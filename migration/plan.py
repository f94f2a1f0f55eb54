"""The rules of a migration, as pure functions: when the live stages stop,
and whether a destination admits more blocks. The live source and
destination and the cluster simulator all use these, so the simulator moves
requests exactly as the instances do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class StagePlan:
    max_stages: int = 8
    """Live stages at most before the stop, however much is still new."""
    final_blocks: int = 1
    """Stop once a stage would copy at most this many new blocks."""


DEFAULT_PLAN = StagePlan()


class StageStep(Enum):
    COPY = "copy"
    """A live stage: copy the new full blocks while the request decodes."""
    WAIT = "wait"
    """Nothing new to copy yet: a stage with no copy."""
    STOP = "stop"
    """Freeze the request and copy the rest in the downtime."""


def stage_step(plan: StagePlan, stages_done: int, new_blocks: int) -> StageStep:
    """What the next stage does, with ``new_blocks`` full blocks not yet copied.
    The first stage always runs; later ones only while they copy enough to be
    worth the request decoding on meanwhile."""
    if stages_done >= plan.max_stages or (stages_done > 0 and new_blocks <= plan.final_blocks):
        return StageStep.STOP
    return StageStep.COPY if new_blocks > 0 else StageStep.WAIT


def full_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of a running request whose KV is final: every full block but
    the one holding the last token (its KV is computed with the next step)."""
    return max(0, (num_tokens - 1) // block_size)


def admits(free_blocks: int, extra_blocks: int, watermark_blocks: int) -> bool:
    """Whether a destination with ``free_blocks`` free (reservations already
    counted) takes ``extra_blocks`` more and keeps ``watermark_blocks`` free."""
    return extra_blocks <= 0 or free_blocks - extra_blocks >= watermark_blocks

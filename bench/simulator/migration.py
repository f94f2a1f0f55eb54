"""Live migration in virtual time: the live source's algorithm
(``migration/source.py``) over two simulated instances.

A ``Migrate`` decision moves up to ``count`` requests, one after another,
chosen on the source by the registered selection policy
(``migration.policies.select``; high priority only when
``autoscaler.policies.may_move_high`` allows it, as in the controller).
Each moves by KV transfer or recompute as ``migration.policies.choose_mode``
decides:

* KV: stage after stage the destination reserves blocks (refusing below its
  watermark) and copies the source's full blocks in
  ``KvTransferModel.transfer_s`` while the request keeps decoding on the
  source; once a stage would copy at most ``StagePlan.final_blocks`` (or
  after ``max_stages``) the source stops it at its next step boundary (pin,
  abort), the last blocks are copied (the downtime), and the request is added
  to the destination with its context so far and its staged KV, so the
  destination prefills only the tail; the source then unpins (frees) its
  blocks.
* recompute: stopped at the source's next step boundary and added to the
  destination at once, which prefills the whole context.

A request that finished meanwhile ends ``source_finished``; one holding no KV
on the source (preempted) ``failed``; a destination without room
``refused``. The request then simply continues where it is.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol

from autoscaler.decisions import Migrate
from autoscaler.policies import may_move_high
from bench.simulator.config import SimulationConfig
from bench.simulator.events import EventQueue
from bench.simulator.instance import SimInstance
from bench.simulator.requests import RequestState
from instance.engine import KvLoad
from migration.plan import StageStep, stage_step
from migration.policies import Movable, choose_mode, select
from migration.protocol import Outcome


class Cluster(Protocol):
    """What migrations need from the simulator."""

    queue: EventQueue

    def instance(self, instance_id: str) -> SimInstance | None: ...

    def running_requests(self, instance: SimInstance) -> list[RequestState]: ...

    def detach(self, request: RequestState, now: float) -> None:
        """The request stopped on its instance (its engine request is gone)."""
        ...

    def place(
        self, request: RequestState, instance: SimInstance, kv: KvLoad | None, now: float
    ) -> None:
        """Continue the request on ``instance``."""
        ...

    def wake(self, instance: SimInstance, now: float) -> None: ...


@dataclass(eq=False)
class _Batch:
    source: SimInstance
    destination: SimInstance
    requests: deque[RequestState]


@dataclass(eq=False)
class _Move:
    batch: _Batch
    request: RequestState
    engine_id: str
    mode: Literal["kv", "recompute"]
    key: str
    copied: int = 0
    stages: int = 0


class Migrations:
    """Migrations in flight and their tallies."""

    def __init__(self, cluster: Cluster, config: SimulationConfig) -> None:
        self._cluster = cluster
        self._config = config
        self._kv = config.hardware.kv_transfer
        self._block_size = config.hardware.block_size
        self._block_bytes = self._kv.bytes_per_token * self._block_size
        self.busy: set[str] = set()
        """Instances with a migration in or out in flight."""
        self.outcomes: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.num_decisions = 0
        self.num_bytes = 0
        self._num_moves = 0

    def start(self, decision: Migrate, now: float) -> None:
        """Execute a ``Migrate`` decision (ignored if either end is gone or busy)."""
        src = self._cluster.instance(decision.source)
        dst = self._cluster.instance(decision.destination)
        if src is None or dst is None or src is dst:
            return
        if {src.instance_id, dst.instance_id} & self.busy:
            return
        by_id = {r.request_id: r for r in self._cluster.running_requests(src)}
        candidates = [Movable(r.request_id, r.priority, r.arrival_s, r.num_tokens, r.num_remaining)
                      for r in by_id.values()]  # fmt: skip
        chosen = select(decision.selection or self._config.selection, candidates, decision.count,
                        include_high=may_move_high(src.status))  # fmt: skip
        self.num_decisions += 1
        if not chosen:
            return
        self.busy |= {src.instance_id, dst.instance_id}
        self._next(_Batch(src, dst, deque(by_id[m.request_id] for m in chosen)), now)

    def _next(self, batch: _Batch, now: float) -> None:
        """Start moving the batch's next request, or end the batch."""
        while batch.requests:
            req = batch.requests.popleft()
            if req.done or req.instance_id != batch.source.instance_id or req.engine_id is None:
                self.outcomes[Outcome.SOURCE_FINISHED.value] += 1
                continue
            mode = choose_mode(self._config.migration_mode, kv_available=self._config.kv_transfer,
                               num_tokens=req.num_tokens, block_size=self._block_size)  # fmt: skip
            self.modes[mode] += 1
            self._num_moves += 1
            move = _Move(batch, req, req.engine_id, mode, f"{req.engine_id}/m{self._num_moves}")
            if mode == "kv":
                self._stage(move, now)
            else:
                self._request_stop(move, now)
            return
        self.busy -= {batch.source.instance_id, batch.destination.instance_id}

    def _stage(self, move: _Move, now: float) -> None:
        """The next live stage, or the stop once little is left to copy."""
        src, dst = move.batch.source, move.batch.destination
        if move.engine_id not in src.core:
            return self._end(move, Outcome.SOURCE_FINISHED, now)
        full = src.core.num_full_blocks(move.engine_id)
        if full is None:  # preempted: no KV to read
            return self._end(move, Outcome.FAILED, now)
        new = full - move.copied
        step = stage_step(self._config.stage_plan, move.stages, new)
        if step is StageStep.STOP:
            return self._request_stop(move, now)
        if step is StageStep.WAIT:
            move.stages += 1
            return self._stage(move, now)
        if not dst.reserve(move.key, move.copied + new, self._config.reservation_watermark_blocks):
            return self._end(move, Outcome.REFUSED, now)
        self._cluster.queue.at(now + self._transfer_s(new), partial(self._staged, move, new))

    def _staged(self, move: _Move, count: int, now: float) -> None:
        move.batch.destination.core.stage(move.key, move.copied, count)
        move.copied += count
        move.stages += 1
        self.num_bytes += count * self._block_bytes
        self._stage(move, now)

    def _transfer_s(self, num_blocks: int) -> float:
        return self._kv.transfer_s(num_blocks * self._block_bytes)

    def _request_stop(self, move: _Move, now: float) -> None:
        """Stop at the source's next step boundary (its tokens so far delivered)."""
        src = move.batch.source
        if src.stepping:
            src.at_step_end.append(partial(self._stop, move))
        else:
            self._stop(move, now)

    def _stop(self, move: _Move, now: float) -> None:
        src, dst, req = move.batch.source, move.batch.destination, move.request
        if move.engine_id not in src.core:
            return self._end(move, Outcome.SOURCE_FINISHED, now)
        full, delay = 0, 0.0
        if move.mode == "kv":
            num_full = src.core.num_full_blocks(move.engine_id)
            if num_full is None:
                return self._end(move, Outcome.FAILED, now)
            full = num_full
            final = full - move.copied
            watermark = self._config.reservation_watermark_blocks
            if final > 0 and not dst.reserve(move.key, full, watermark):
                return self._end(move, Outcome.REFUSED, now)
            delay = self._transfer_s(final) if final > 0 else 0.0
            src.core.pin(move.engine_id)
        src.core.abort(move.engine_id)
        src.version += 1
        self._cluster.detach(req, now)
        self._cluster.queue.at(now + delay, partial(self._commit, move, full))

    def _commit(self, move: _Move, full: int, now: float) -> None:
        """The last blocks are in: the destination adopts the request."""
        src, dst = move.batch.source, move.batch.destination
        if move.mode == "kv":
            if full > move.copied:
                dst.core.stage(move.key, move.copied, full - move.copied)
                self.num_bytes += (full - move.copied) * self._block_bytes
                move.copied = full
                move.stages += 1
            src.core.unpin(move.engine_id)
            src.version += 1
            self._cluster.wake(src, now)
        dst.release(move.key)
        kv = KvLoad(move.key, move.copied * self._block_size) if move.copied else None
        move.request.num_migrations += 1
        self._cluster.place(move.request, dst, kv, now)
        self.outcomes[Outcome.MIGRATED.value] += 1
        self._next(move.batch, now)

    def _end(self, move: _Move, outcome: Outcome, now: float) -> None:
        """The move did not happen: the request stays; the destination forgets it."""
        dst = move.batch.destination
        dst.release(move.key)
        dst.core.drop(move.key)
        self.outcomes[outcome.value] += 1
        self._next(move.batch, now)

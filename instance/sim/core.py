"""The simulated engine's scheduler: a pure state machine with a step API.

``SimCore`` holds no clock and does no I/O. ``step()`` schedules one batch
(continuous batching over paged KV blocks, waiting queue ordered by priority
then arrival, preemption by recompute when blocks run out) and returns what the
step produced together with its modelled duration. A driver either sleeps that
long (wall time, inside a worker) or advances a virtual clock (the simulator).

Live migration by KV transfer (driven by ``instance.sim.kv.SimKvPort``) uses
three more pieces of state, all without data (the sim has no KV tensors):

* pins: a pinned request that is aborted keeps its blocks (still counted as
  used) until unpinned, so a migration's last blocks can still be read;
* staging: logical blocks pulled from a peer, per migration key;
* loads: a request added with ``kv_transfer`` whose key is staged starts with
  the staged leading tokens already computed, so its prefill covers only the
  rest. Without staged blocks it recomputes, like vLLM's
  ``kv_load_failure_policy="recompute"``.
"""

from __future__ import annotations

import bisect
import itertools
import zlib
from dataclasses import dataclass, field

from instance.engine import EngineLoad, EngineRequest, RequestLoad, blocks_for
from instance.sim.latency import LatencyModel


@dataclass(frozen=True)
class SimConfig:
    num_blocks: int = 1024
    """KV-cache capacity in blocks."""
    block_size: int = 16
    """Tokens per block."""
    max_num_seqs: int = 64
    """Largest number of running requests."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (prefill tokens plus one per decode)."""
    latency: LatencyModel = field(default_factory=LatencyModel)
    """Modelled duration of a step (LLaMA-7B on an A10 by default)."""

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError(f"invalid SimConfig: {self}")


@dataclass(frozen=True)
class SimOutput:
    request_id: str
    token_id: int
    finish_reason: str | None


@dataclass(frozen=True)
class SimStep:
    duration_s: float
    outputs: tuple[SimOutput, ...]
    batch: tuple[str, ...]
    """Ids of the requests run in this step, in scheduling order."""
    num_prefill_tokens: int
    num_decode_seqs: int
    preempted: tuple[str, ...]


@dataclass(eq=False)
class _Req:
    request: EngineRequest
    seq: int
    output_ids: list[int] = field(default_factory=list)
    num_blocks: int = 0
    prefilled: bool = False
    kv_pending: bool = False
    """Added with ``kv_transfer``: its staged KV loads at its first admission."""
    num_loaded: int = 0
    """Leading tokens whose KV was loaded from staging at admission (their
    prefill is skipped); 0 once preempted, since the KV is then gone."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens the request's prefill computes when it is admitted."""
        return self.num_tokens - self.num_loaded

    @property
    def order(self) -> tuple[int, float, int]:
        """Scheduling order: priority rank, then arrival, then submission."""
        return (self.request.priority.rank, self.request.arrival_time, self.seq)


class SimCore:
    """Continuous-batching scheduler over paged KV blocks (see module doc)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._seq = itertools.count()
        self._running: list[_Req] = []
        self._waiting: list[_Req] = []
        self._by_id: dict[str, _Req] = {}
        self._num_free = config.num_blocks
        self.num_preempted_total = 0
        self.num_finished_total = 0
        self.num_generation_tokens_total = 0
        self._pins: set[str] = set()
        self._held: dict[str, _Req] = {}
        """Aborted while pinned: their blocks stay allocated until unpinned."""
        self._staging: dict[str, set[int]] = {}
        self.num_loaded_blocks_total = 0

    # -- requests ---------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        if request.request_id in self._by_id:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        peak = len(request.prompt_token_ids) + request.sampling.max_tokens
        if blocks_for(peak, self.config.block_size) > self.config.num_blocks:
            raise ValueError(
                f"request needs {blocks_for(peak, self.config.block_size)} blocks "
                f"> capacity {self.config.num_blocks}"
            )
        req = _Req(request=request, seq=next(self._seq))
        req.kv_pending = request.kv_transfer is not None
        self._by_id[request.request_id] = req
        bisect.insort(self._waiting, req, key=lambda r: r.order)

    def abort(self, request_id: str) -> bool:
        req = self._by_id.pop(request_id, None)
        if req is None:
            return False
        if req in self._running:
            self._running.remove(req)
            if request_id in self._pins:  # a migration's stop: keep the blocks
                self._held[request_id] = req
                return True
        else:
            self._waiting.remove(req)
        self._free(req)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    # -- scheduling -------------------------------------------------------
    def step(self) -> SimStep:
        preempted = self._grow_running()
        num_decodes = len(self._running)
        prefills = self._admit(budget=self.config.max_num_batched_tokens - num_decodes)
        decodes = [r for r in self._running if r not in prefills]
        num_prefill_tokens = sum(r.num_prefill_tokens for r in prefills)
        duration = self.config.latency.step_duration_s(
            num_prefill_tokens=num_prefill_tokens,
            num_decode_seqs=len(decodes),
            num_context_tokens=sum(r.num_tokens for r in decodes),
        )
        batch = tuple(r.request_id for r in self._running)
        outputs = tuple(self._emit(r) for r in list(self._running))
        return SimStep(
            duration_s=duration,
            outputs=outputs,
            batch=batch,
            num_prefill_tokens=num_prefill_tokens,
            num_decode_seqs=len(decodes),
            preempted=tuple(preempted),
        )

    def _grow_running(self) -> list[str]:
        """Give every running request the blocks its next token needs,
        preempting the lowest-priority, latest request when blocks run out."""
        preempted: list[str] = []
        for req in sorted(self._running, key=lambda r: r.order):
            if req not in self._running:
                continue
            need = blocks_for(req.num_tokens, self.config.block_size) - req.num_blocks
            while need > self._num_free:
                victim = max(self._running, key=lambda r: r.order)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req in self._running and need > 0:
                self._num_free -= need
                req.num_blocks += need
        return preempted

    def _admit(self, budget: int) -> list[_Req]:
        admitted: list[_Req] = []
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            head = self._waiting[0]
            need = blocks_for(head.num_tokens, self.config.block_size)
            loaded = self._staged_tokens(head) if head.kv_pending else 0
            if need > self._num_free or (admitted and head.num_tokens - loaded > budget):
                break
            self._waiting.pop(0)
            self._num_free -= need
            head.num_blocks = need
            if head.kv_pending:
                self._load(head, loaded)
            head.prefilled = True
            budget -= head.num_prefill_tokens
            self._running.append(head)
            admitted.append(head)
        return admitted

    def _staged_tokens(self, req: _Req) -> int:
        """Leading tokens of ``req`` whose KV is staged: whole blocks from
        block 0 on, at most what the source sent, and never the last token
        (the step that produces the next token must run it)."""
        load = req.request.kv_transfer
        assert load is not None
        staged = self._staging.get(load.key, set())
        num_blocks = 0
        while num_blocks in staged:
            num_blocks += 1
        bs = self.config.block_size
        return min(num_blocks, min(load.num_tokens, req.num_tokens - 1) // bs) * bs

    def _load(self, req: _Req, num_tokens: int) -> None:
        """Admission of a migrated request: its staged KV fills its first blocks."""
        assert req.request.kv_transfer is not None
        self._staging.pop(req.request.kv_transfer.key, None)
        req.kv_pending = False
        req.num_loaded = num_tokens
        self.num_loaded_blocks_total += num_tokens // self.config.block_size

    def _emit(self, req: _Req) -> SimOutput:
        token = _next_token(req.request.prompt_token_ids, req.output_ids)
        req.output_ids.append(token)
        self.num_generation_tokens_total += 1
        sampling = req.request.sampling
        finish = ("stop" if token in sampling.stop_token_ids and len(req.output_ids)
                  > sampling.min_tokens else
                  "length" if len(req.output_ids) >= sampling.max_tokens else None)  # fmt: skip
        if finish is not None:
            self._running.remove(req)
            del self._by_id[req.request_id]
            self._free(req)
            self.num_finished_total += 1
        return SimOutput(request_id=req.request_id, token_id=token, finish_reason=finish)

    def _preempt(self, req: _Req) -> None:
        self._running.remove(req)
        self._free(req)
        req.prefilled = False
        req.num_loaded = 0
        self.num_preempted_total += 1
        bisect.insort(self._waiting, req, key=lambda r: r.order)

    def _free(self, req: _Req) -> None:
        self._num_free += req.num_blocks
        req.num_blocks = 0
        assert 0 <= self._num_free <= self.config.num_blocks, self._num_free

    # -- KV transfer (live migration) -------------------------------------
    def pin(self, request_id: str) -> None:
        """Keep the request's blocks if it is aborted, until :meth:`unpin`."""
        self._pins.add(request_id)

    def unpin(self, request_id: str) -> None:
        """Drop the pin; an aborted request's kept blocks are freed."""
        self._pins.discard(request_id)
        held = self._held.pop(request_id, None)
        if held is not None:
            self._free(held)

    def num_full_blocks(self, request_id: str) -> int | None:
        """Blocks of the request whose KV is computed and will not change
        (every token but the last sampled one, in whole blocks), readable by
        a peer; None if it holds no KV here (unknown, waiting, preempted or
        finished). A pinned request keeps its blocks after an abort."""
        req = self._held.get(request_id) or self._by_id.get(request_id)
        if req is None or req.num_blocks == 0:
            return None
        return (req.num_tokens - 1) // self.config.block_size

    def stage(self, key: str, first: int, count: int) -> None:
        """Record logical blocks ``[first, first + count)`` as staged under ``key``."""
        self._staging.setdefault(key, set()).update(range(first, first + count))

    def drop(self, key: str) -> None:
        self._staging.pop(key, None)

    @property
    def pinned(self) -> list[str]:
        return sorted(self._pins)

    @property
    def held(self) -> list[str]:
        """Aborted requests whose blocks a pin keeps (vLLM's delayed frees)."""
        return sorted(self._held)

    @property
    def staging(self) -> dict[str, int]:
        """Blocks staged per migration key."""
        return {key: len(blocks) for key, blocks in self._staging.items()}

    # -- observation ------------------------------------------------------
    def load(self) -> EngineLoad:
        bs = self.config.block_size
        return EngineLoad(
            num_blocks_total=self.config.num_blocks,
            num_blocks_used=self.config.num_blocks - self._num_free,
            running=tuple(self._request_load(r, r.num_blocks) for r in self._running),
            waiting=tuple(
                self._request_load(r, blocks_for(r.num_tokens, bs)) for r in self._waiting
            ),
            num_preempted_total=self.num_preempted_total,
            num_finished_total=self.num_finished_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
        )

    @staticmethod
    def _request_load(req: _Req, num_blocks: int) -> RequestLoad:
        return RequestLoad(
            request_id=req.request_id,
            priority=req.request.priority,
            arrival_time=req.request.arrival_time,
            num_tokens=req.num_tokens,
            num_blocks=num_blocks,
        )

    def check_invariants(self) -> None:
        """Block accounting is exact: blocks held (running requests and
        pinned aborted ones) + free blocks == capacity."""
        held = sum(r.num_blocks for r in (*self._running, *self._held.values()))
        assert all(r.num_blocks == 0 for r in self._waiting), "waiting request holds blocks"
        assert held + self._num_free == self.config.num_blocks, (held, self._num_free)
        assert self._num_free >= 0
        assert len(self._running) <= self.config.max_num_seqs


def _next_token(prompt: tuple[int, ...], output: list[int]) -> int:
    """The sim's "greedy decoding": a lower-case letter that depends only on
    the context (its last tokens and its length), as a greedy LLM's next
    token does, so a request continued from any point of its output (after a
    migration by recompute, or a replay) goes on exactly as it would have."""
    tail = output[-4:]
    if len(tail) < 4:
        tail = [*prompt[len(tail) - 4 :], *tail]
    return 97 + (zlib.crc32(bytes(t % 256 for t in tail)) + 7 * (len(prompt) + len(output))) % 26

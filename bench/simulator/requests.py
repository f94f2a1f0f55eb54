"""One trace request's life in the simulator, across the engine requests
(segments) it runs as on one instance after another."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.traces import TraceRequest
from infra.contract import SamplingSpec
from infra.records import Priority
from instance.engine import EngineRequest, KvLoad

_NO_TOKENS: tuple[int, ...] = ()


@dataclass(eq=False, slots=True)
class RequestState:
    index: int
    trace: TraceRequest
    num_output: int = 0
    """Output tokens delivered so far, on every instance."""
    instance_id: str | None = None
    """Where it runs now (None: held, moving, or done)."""
    engine_id: str | None = None
    segment: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    error: str | None = None
    num_preemptions: int = 0
    preempted_at: float | None = None
    """Set from a preemption until its next token."""
    preemption_loss_s: float = 0.0
    recomputed_tokens: int = 0
    """Context tokens whose KV a preemption threw away (prefilled again)."""
    num_migrations: int = 0
    stopped_at: float | None = None
    """Set from a migration's stop until its first token on the destination."""
    downtimes_s: list[float] = field(default_factory=list)
    honour_priority: bool = True
    """Off: served as normal priority whatever the trace says."""

    @property
    def request_id(self) -> str:
        return f"req-{self.index}"

    @property
    def priority(self) -> Priority:
        """The priority it is served with (the trace's, unless not honoured)."""
        return self.trace.priority if self.honour_priority else Priority.NORMAL

    @property
    def arrival_s(self) -> float:
        return self.trace.arrival_s

    @property
    def num_tokens(self) -> int:
        """Context so far: prompt and output."""
        return self.trace.prompt_tokens + self.num_output

    @property
    def num_remaining(self) -> int:
        return self.trace.output_tokens - self.num_output

    @property
    def done(self) -> bool:
        return self.finish_s is not None or self.error is not None

    def next_segment(self, kv: KvLoad | None = None) -> EngineRequest:
        """The engine request that continues it from here (as
        ``instance.generation.Generation.next_segment``): the context so far
        as the prompt, the remaining tokens to generate."""
        self.segment += 1
        self.engine_id = f"{self.request_id}~{self.segment}"
        return EngineRequest(
            request_id=self.engine_id,
            prompt_token_ids=(0,) * self.num_tokens if self.num_tokens else _NO_TOKENS,
            sampling=SamplingSpec(max_tokens=self.num_remaining, ignore_eos=True),
            priority=self.priority,
            arrival_time=self.trace.arrival_s,
            kv_transfer=kv,
        )

    def on_token(self, now: float) -> None:
        """A token delivered at ``now``."""
        self.num_output += 1
        if self.first_token_s is None:
            self.first_token_s = now
        if self.preempted_at is not None:
            self.preemption_loss_s += now - self.preempted_at
            self.preempted_at = None
        if self.stopped_at is not None:
            self.downtimes_s.append(now - self.stopped_at)
            self.stopped_at = None

    def on_preempted(self, now: float) -> None:
        self.num_preemptions += 1
        self.recomputed_tokens += self.num_tokens
        if self.preempted_at is None:
            self.preempted_at = now

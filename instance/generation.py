"""One logical request as this instance serves it, across engine segments.

A request normally runs as one engine request. Live migration freezes it
(tokens the engine produces after the freeze are dropped, because the
destination will produce them again), then either moves it — this
instance's stream ends by pointing the client at the destination — or rolls
back and resumes it here as a new segment whose prompt is everything so far
(its KV is still in the prefix cache, so nothing is recomputed but the tail).
A migrated-in request starts here as a segment of the same kind, with its
first tokens' KV staged by the source.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace

from infra.records import Priority
from instance.engine import EngineRequest, KvLoad
from instance.stops import StopWindow
from instance.text import TextStream
from migration.protocol import ResumeSpec


@dataclass
class Generation:
    request: EngineRequest
    """The request as first received (logical id, original prompt, sampling)."""
    num_prompt_tokens: int
    """Prompt length the client sees in usage."""
    earlier_output: tuple[int, ...] = ()
    """Tokens generated on instances this request ran on before."""
    migratable: bool = True
    """Its caller follows a migration (the gateway does)."""
    resume_token: str | None = None
    """What its caller presents to resume it after a migration (it moves
    with the request; None: nobody may)."""
    delivered: list[int] = field(default_factory=list)
    """Tokens this instance has streamed to the client."""
    engine_request_id: str = ""
    segment: int = 0
    frozen: bool = False
    finished: bool = False
    kv_load: KvLoad | None = None
    emitted_chars: int = 0
    """Characters of text the client has received so far (all instances)."""
    text: TextStream | None = None
    """Its text so far (None until the worker starts it here)."""
    stops: StopWindow = field(default_factory=lambda: StopWindow(()))
    """Its stop strings over the text (set from its sampling)."""
    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once an engine here has taken the request (running or queued)."""
    _outcome: asyncio.Future[str | None] | None = None
    _segment_start: int = 0
    """``delivered`` when the current engine request started."""

    def __post_init__(self) -> None:
        s = self.request.sampling
        self.stops = StopWindow(s.stop, s.include_stop_str_in_output, self.stops.held)

    @property
    def pinned_by(self) -> str | None:
        """What keeps it on this instance, if anything: a structured-output
        constraint (a resumed engine request would start its grammar again),
        an output parser (reasoning, tool calls: its state is here),
        seeded sampling (its random stream would start again, so the rest
        would differ from what the seed gives unmoved), or presence and
        frequency penalties (vLLM counts them over the engine request's own
        output, which a resumed request would lack)."""
        s = self.request.sampling
        if self.request.parser is not None:  # its parser's state is here
            return self.request.parser.pin_reason
        if s.structured is not None:
            return "structured_output"
        if s.seed is not None and s.temperature > 0.0:
            return "seeded_sampling"
        if s.presence_penalty or s.frequency_penalty:
            return "output_penalties"
        return None

    @property
    def movable(self) -> bool:
        """Live migration may move it."""
        return self.migratable and self.pinned_by is None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        """Whole context so far: prompt, earlier output, output here."""
        return [*self.request.prompt_token_ids, *self.earlier_output, *self.delivered]

    @property
    def num_output(self) -> int:
        return len(self.earlier_output) + len(self.delivered)

    @property
    def num_remaining(self) -> int:
        return self.request.sampling.max_tokens - self.num_output

    @property
    def priority(self) -> Priority:
        return self.request.priority

    @property
    def arrival_time(self) -> float:
        return self.request.arrival_time

    @property
    def holds_kv(self) -> bool:
        return len(self.delivered) > self._segment_start

    def next_segment(self) -> EngineRequest:
        """The engine request that continues this generation from here."""
        self._segment_start = len(self.delivered)
        self.segment += 1
        self.engine_request_id = f"{self.request_id}~{self.segment}-{uuid.uuid4().hex[:6]}"
        if self.segment == 1 and not self.earlier_output and self.kv_load is None:
            return replace(self.request, request_id=self.engine_request_id)
        sampling = self.request.sampling.after(self.num_output)
        load, self.kv_load = self.kv_load, None
        return replace(self.request, request_id=self.engine_request_id,
                       prompt_token_ids=tuple(self.tokens), sampling=sampling,
                       kv_transfer=load)  # fmt: skip

    def continue_after(self, output_token_ids: list[int], emitted_chars: int) -> None:
        """Start after output the client already has (a replayed request)."""
        self.earlier_output = tuple(output_token_ids)
        self.emitted_chars = emitted_chars

    # -- migration (source side) ---------------------------------------------
    def resume_spec(self, key: str, tokens: list[int], num_kv_tokens: int, *,
                    frozen_for_s: float) -> ResumeSpec:  # fmt: skip
        r = self.request
        num_prompt = len(r.prompt_token_ids)
        return ResumeSpec(
            key=key, request_id=self.request_id, prompt_token_ids=list(r.prompt_token_ids),
            output_token_ids=tokens[num_prompt:], num_kv_tokens=num_kv_tokens,
            sampling=r.sampling, priority=r.priority, arrival_time=r.arrival_time,
            emitted_chars=self.emitted_chars, frozen_for_s=frozen_for_s,
            resume_token=self.resume_token,
            text=self.text.state.model_copy(update={"held": self.stops.held})
            if self.text is not None else None,
        )  # fmt: skip

    @classmethod
    def resumed(cls, spec: ResumeSpec) -> Generation:
        """A request migrated in: it continues here from ``spec``."""
        return cls(
            EngineRequest(request_id=spec.request_id,
                          prompt_token_ids=tuple(spec.prompt_token_ids), sampling=spec.sampling,
                          priority=spec.priority, arrival_time=spec.arrival_time),
            num_prompt_tokens=len(spec.prompt_token_ids),
            earlier_output=tuple(spec.output_token_ids),
            migratable=True,
            resume_token=spec.resume_token,
            kv_load=KvLoad(spec.key, spec.num_kv_tokens) if spec.num_kv_tokens else None,
            emitted_chars=spec.emitted_chars,
            stops=StopWindow((), held=spec.text.held if spec.text is not None else ""),
        )  # fmt: skip

    def freeze(self) -> list[int]:
        """Stop streaming here and return the context the destination takes over."""
        self.frozen = True
        self._outcome = asyncio.get_running_loop().create_future()
        return self.tokens

    def moved_to(self, address: str) -> None:
        assert self._outcome is not None
        self._outcome.set_result(address)

    def resume_here(self) -> None:
        assert self._outcome is not None
        if not self._outcome.done():
            self._outcome.set_result(None)

    async def outcome(self) -> str | None:
        """After a freeze: the destination's address, or None to resume here."""
        assert self._outcome is not None
        destination = await self._outcome
        self.frozen = False
        self._outcome = None
        return destination

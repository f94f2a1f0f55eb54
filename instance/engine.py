"""The engine interface the worker drives, and the typed values crossing it.

Two engines implement it: ``vllm`` (upstream vLLM's ``AsyncLLM``) and ``sim``
(a simulated paged-KV engine). The worker only ever talks to :class:`Engine`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from infra.contract import Message, PromptLogprob, SamplingSpec, TokenLogprob
from infra.records import Priority
from instance.output_parsing import OutputParsing, OutputSession
from migration.ports import KvPort


@dataclass(frozen=True)
class EngineRequest:
    """One generation request as the engine sees it: already tokenised."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    priority: Priority = Priority.NORMAL
    arrival_time: float = 0.0
    kv_transfer: KvLoad | None = None
    """Set on a migrated request: KV of its first tokens is staged here."""
    parser: OutputSession | None = field(default=None, compare=False)
    """The parser of its output (reasoning, tool calls), when one runs for it."""


@dataclass(frozen=True)
class KvLoad:
    """KV staged on this instance for a migrated request's first tokens."""

    key: str
    num_tokens: int
    """Tokens whose KV is staged (whole blocks); the rest is recomputed."""


@dataclass(frozen=True)
class TokenDelta:
    """Tokens produced for one request since the previous delta."""

    token_ids: tuple[int, ...]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    """Output tokens produced so far, this delta included."""
    finish_reason: str | None = None
    """``stop``, ``length`` or ``abort`` on the last delta, else ``None``."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per token, when the request asked for logprobs."""
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
    """One per prompt token, on the first delta of an engine request that
    asked for prompt logprobs."""


@dataclass(frozen=True)
class RequestLoad:
    """KV footprint of one request inside an engine."""

    request_id: str
    priority: Priority
    arrival_time: float
    num_tokens: int
    """Tokens of context (prompt + generated) the request holds or needs."""
    num_blocks: int
    """Blocks it holds (running) or will need to start (waiting)."""


@dataclass(frozen=True)
class EngineLoad:
    """Raw load figures read off an engine at one instant."""

    num_blocks_total: int
    num_blocks_used: int
    running: Sequence[RequestLoad] = ()
    waiting: Sequence[RequestLoad] = ()
    """Waiting requests in scheduling order: the head is the next to run."""
    num_preempted_total: int = 0
    num_finished_total: int = 0
    num_generation_tokens_total: int = 0


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    """What else the chat template may read: ``tool_calls``, ``tool_call_id``, ``name``."""

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, **self.extra}


def chat_messages(messages: Sequence[Message]) -> list[ChatMessage]:
    """The request's messages as the chat template reads them."""
    return [ChatMessage(m.role, m.text(), m.model_dump(
        include={"name", "tool_call_id", "tool_calls"}, exclude_none=True))
        for m in messages]  # fmt: skip


@dataclass
class EngineLimits:
    """Static shape of an engine, fixed once it has started."""

    block_size: int
    num_blocks_total: int
    max_num_seqs: int
    max_model_len: int
    extra: dict[str, str] = field(default_factory=dict)
    platform: str = ""
    """Where it runs: ``cpu``, ``cuda``, ... (``sim`` for the sim engine)."""
    devices: tuple[str, ...] = ()
    """Names of the devices it uses (none on CPU)."""
    engine_args: dict[str, str | int | float | bool | None] = field(default_factory=dict)
    """The engine arguments chosen for it (``instance.engine_args``; None:
    the engine's own choice)."""

    @property
    def capacity_tokens(self) -> int:
        """KV-cache capacity in tokens."""
        return self.num_blocks_total * self.block_size


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks needed to hold ``num_tokens`` tokens."""
    return math.ceil(num_tokens / block_size) if num_tokens > 0 else 0


class Tokenizer(Protocol):
    """Text <-> token ids for one model, with its chat template."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, Any]] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The prompt's tokens: ``messages`` (and ``tools``, for templates
        that show them) rendered by the model's chat template, given the
        variables ``kwargs`` too."""
        ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str: ...  # fmt: skip


def _nothing() -> None:
    """The default ``admitted`` callback."""


class EngineDeadError(RuntimeError):
    """The engine stopped working; the instance must leave the registry."""


class Engine(Protocol):
    """What the worker needs from an engine."""

    @property
    def kind(self) -> str: ...

    @property
    def output_parsing(self) -> OutputParsing | None:
        """The output parsers it runs (None: none)."""

    def check(self, sampling: SamplingSpec) -> None:
        """Raise a ``BadRequestError`` for sampling it cannot do (the sim has
        no logprobs; vLLM checks a structured-output constraint compiles)."""
        ...

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(
        self, request: EngineRequest, admitted: Callable[[], None] = _nothing
    ) -> AsyncGenerator[TokenDelta, None]:
        """Stream deltas until the request finishes. ``admitted`` is called
        once the engine has taken the request (it runs or waits in the
        scheduler's queue): a migration hands the client over then. Closing
        the iterator early (the caller went away) must abort the request and
        free its blocks."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    @property
    def kv_port(self) -> KvPort | None:
        """KV transfer for migration, or None (migration recomputes)."""
        ...

    def load(self) -> EngineLoad: ...

    @property
    def healthy(self) -> bool: ...

"""The gateway <-> instance contract: the HTTP payloads of the instance worker
(``POST /generate`` and its stream), and the sampling parameters every layer
carries whole (``SamplingSpec``: the instance's engine request, a migration's
resume spec).

The worker speaks a small internal protocol, not the OpenAI one: the gateway
translates. A streaming response is newline-delimited JSON, one
:class:`GenerateChunk` per line; the last chunk carries ``finish_reason`` and
``usage`` (or ``error`` if the engine failed mid-stream).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from infra.errors import ErrorDetail
from infra.records import Priority

MAX_STOP_SEQUENCES = 8
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
"""Most top alternatives per token (vLLM's default ``max_logprobs``)."""
MAX_LOGIT_BIAS = 300
"""At most this many biased tokens (OpenAI's limit)."""
MAX_ID_LENGTH = 128
MAX_CHOICES = 64
"""Most options a ``choice`` constraint may list."""

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
"""OpenAI's ``reasoning_effort`` values, with vLLM's ``max``."""
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize",
    "return_dict", "return_assistant_tokens_mask", "add_generation_prompt",
    "continue_final_message", "tokenizer_kwargs",
})  # fmt: skip
"""Chat-template arguments the renderer sets itself: not a request's to give."""


class StructuredSpec(BaseModel):
    """A constraint on the output, run by the engine's structured-output
    backend (vLLM's ``StructuredOutputsParams``): exactly one of ``json_schema``,
    ``json_object``, ``regex``, ``choice`` or ``grammar``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_schema: dict[str, Any] | None = None
    """The output is JSON valid against this schema."""
    json_object: bool | None = None
    """The output is any JSON object."""
    regex: str | None = None
    choice: tuple[str, ...] | None = Field(default=None, max_length=MAX_CHOICES)
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF (GBNF) or Lark grammar."""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredSpec:
        kinds = [k for k in ("json_schema", "json_object", "regex", "choice", "grammar")
                 if getattr(self, k) is not None]  # fmt: skip
        if len(kinds) != 1:
            got = ", ".join(kinds) or "none"
            raise ValueError("give exactly one structured-output constraint of json, "
                             f"json_object, regex, choice, grammar (got {got})")  # fmt: skip
        return self


class SamplingSpec(BaseModel):
    """Engine-neutral sampling parameters (the OpenAI subset Shoal honours)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    include_stop_str_in_output: bool = False
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends (``stop``) after any of these tokens."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit) pairs."""
    logprobs: int | None = None
    """Return each sampled token's logprob and this many most likely
    alternatives (None: no logprobs)."""
    structured: StructuredSpec | None = None
    """Constrain the output (None: free text)."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """How special tokens appear in the text (vLLM's options)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob and this many top alternatives
    (None: none), once, before the first output token."""

    def after(self, num_done: int) -> SamplingSpec:
        """The same sampling for the rest of a request that has ``num_done``
        tokens (its prompt logprobs are out already)."""
        rest = {
            "max_tokens": self.max_tokens - num_done,
            "min_tokens": max(0, self.min_tokens - num_done),
            "prompt_logprobs": None,
        }
        return self.model_copy(update=rest)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str
    """The arguments as a JSON text."""


class ToolCall(BaseModel):
    """A call the assistant made, as OpenAI writes it in a message."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    """The call a ``tool`` message answers."""
    tool_calls: list[ToolCall] | None = None
    """The calls an ``assistant`` message made."""

    @model_validator(mode="after")
    def _complete(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("a message needs 'content' (or, from the assistant, 'tool_calls')")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments."""
    strict: bool | None = None


class Tool(BaseModel):
    """A function the model may call (OpenAI's ``tools`` entry)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the one function to call."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def some_tools(tools: list[Tool] | None) -> list[Tool] | None:
    """``tools`` as given; a ``ValueError`` for an empty list (as OpenAI's)."""
    if tools is not None and not tools:
        raise ValueError("'tools' must not be empty: give at least one tool or leave it out")
    return tools


def tool_choice_of(tools: list[Tool] | None, choice: ToolChoice | None) -> ToolChoice | None:
    """The effective ``tool_choice`` (``auto`` when tools come without one, as
    OpenAI and vLLM default it); a ``ValueError`` for a choice that does not
    fit the tools."""
    if choice is None:
        return "auto" if tools else None
    if choice != "none" and not tools:
        raise ValueError("'tool_choice' needs 'tools'")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {
        t.function.name for t in tools or ()
    }:
        raise ValueError(f"'tool_choice' names {choice.function.name!r}, which is not in 'tools'")
    return choice


class Continuation(BaseModel):
    """A request taken up again after the instance serving it failed: the
    output its client already has. The instance generates only the rest,
    its text going on from the characters the client has, and counts it all
    in ``usage``."""

    model_config = ConfigDict(extra="forbid")

    output_token_ids: list[int] = Field(min_length=1)
    emitted_chars: int = Field(ge=0, description="characters of text the client has")


class GenerateRequest(BaseModel):
    """A generation request: chat ``messages`` or a raw ``prompt`` (text or ids)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LENGTH)
    model: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    prompt: str | list[int] | None = None
    tools: list[Tool] | None = None
    """Functions the model may call, given to the chat template."""
    tool_choice: ToolChoice | None = Field(default=None, validate_default=True)
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    """Given to the chat template (``none`` turns thinking off, as vLLM's)."""
    include_reasoning: bool = True
    """False: a reasoning parser's reasoning (and the logprobs) is left out."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (vLLM's extension)."""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    """Token id to a bias in [-100, 100] added to its logit."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Each token's logprob with this many top alternatives (None: none)."""
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    """Keep only the prompt's last this many tokens (vLLM's extension)."""
    structured: StructuredSpec | None = None
    """Constrain the output to a JSON schema, regex, choice or grammar."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """The prompt tokens' logprobs with this many top alternatives, on the first chunk."""
    n: int = Field(default=1, ge=1, le=1, description="Only n = 1 is supported")
    priority: Priority = Priority.NORMAL
    stream: bool = False
    migratable: bool = False
    """The caller follows ``migrated_to`` chunks (the gateway does), so the
    request may be live-migrated to another instance."""
    continuation: Continuation | None = None
    """Set when the gateway replays a request whose instance failed mid-stream."""
    resume_token: str | None = Field(default=None, min_length=16, max_length=128)
    """A secret of the gateway that sent the request: whoever resumes it
    after a migration (``GET /resume/{id}``) must present it, so only its
    owner reads the rest of its output (None: nobody may resume it)."""

    _some_tools = field_validator("tools")(some_tools)

    @field_validator("tool_choice")
    @classmethod
    def _fits_the_tools(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        return tool_choice_of(info.data.get("tools"), choice)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if isinstance(self.prompt, str) and not self.prompt:
            raise ValueError("'prompt' must not be empty")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("'prompt' must not be empty")
        if len(self.stop_sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("'min_tokens' must not exceed 'max_tokens'")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("'logit_bias' values must be in [-100, 100]")
        if self.tools is not None and self.messages is None:
            raise ValueError("'tools' need chat 'messages'")
        if reserved := sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or ())):
            raise ValueError(f"'chat_template_kwargs' may not set {', '.join(reserved)}")
        done = len(self.continuation.output_token_ids) if self.continuation else 0
        if self.max_tokens is not None and done >= self.max_tokens:
            raise ValueError("a continuation must leave tokens to generate within 'max_tokens'")
        return self

    def sampling(self, max_tokens: int) -> SamplingSpec:
        """The request's sampling, with ``max_tokens`` resolved by the instance."""
        return SamplingSpec(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_tokens=self.min_tokens, seed=self.seed,
            stop=self.stop_sequences, ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_p=self.min_p,
            include_stop_str_in_output=self.include_stop_str_in_output,
            stop_token_ids=tuple(self.stop_token_ids),
            logit_bias=tuple(sorted(self.logit_bias.items())), logprobs=self.logprobs,
            structured=self.structured, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )  # fmt: skip

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's variables, as vLLM gives them: the request's
        ``chat_template_kwargs``, ``reasoning_effort`` and, for an effort,
        ``enable_thinking`` (false for ``none``) unless the request sets it."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        seqs = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in seqs if s)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reasoning_tokens: int | None = Field(default=None, exclude_if=lambda v: v is None)
    """Of the completion, where a reasoning parser ran."""


class TopLogprob(BaseModel):
    token_id: int
    token: str
    """The token's text, as the engine decodes it alone."""
    logprob: float
    rank: int | None = None
    """1 for the most likely token at its place (None: not known)."""


class TokenLogprob(TopLogprob):
    """A sampled token's logprob and the most likely alternatives at its place."""

    top: list[TopLogprob] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """A prompt token's logprob (None for the first, which nothing predicts)
    and the most likely alternatives at its place."""

    token_id: int
    token: str
    logprob: float | None = None
    rank: int | None = None
    top: list[TopLogprob] = Field(default_factory=list)


class ToolCallDelta(BaseModel):
    """A piece of a tool call as it streams: the call at ``index`` gets its
    id and name first, then its arguments' text in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


class MessageDelta(BaseModel):
    """A chunk's text as the instance's output parser splits it: reasoning,
    message content and pieces of tool calls."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = Field(default_factory=list)


class ParsedMessage(BaseModel):
    """The whole output as the output parser reads it, on the last chunk."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str | None = None
    """Of a whole response: ``tool_calls`` when the model called tools
    (vLLM's rule for whole responses)."""
    stream_finish_reason: str | None = None
    """Of a stream's last chunk (vLLM's rule for streams)."""


class GenerateChunk(BaseModel):
    """One line of a streaming response."""

    request_id: str
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    """The request's whole usage, on its last chunk."""
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None
    """The request's output so far, migrations and replays included (on
    chunks with tokens): the running usage of ``continuous_usage_stats``."""
    num_reasoning_tokens: int | None = None
    """Of that output, the reasoning (where a reasoning parser runs)."""
    logprobs: list[TokenLogprob] | None = None
    """One per token of ``token_ids``, when the request asked for logprobs."""
    prompt_logprobs: list[PromptLogprob] | None = None
    """One per prompt token, on the first chunk of a request that asked for
    prompt logprobs."""
    message: MessageDelta | None = None
    """``text`` as an output parser split it (None: no parser runs; the
    text is all content)."""
    parsed: ParsedMessage | None = None
    """The whole output as the parser read it, on the last chunk."""
    error: ErrorDetail | None = None
    migrated_to: str | None = None
    """Last chunk of a request that moved: continue at this instance's
    ``/resume/{request_id}``."""


ChunkBatch = list[GenerateChunk]
"""Chunks of one request that arrived together."""


class GenerateResponse(BaseModel):
    """A whole (non-streaming) response."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage


class AbortResponse(BaseModel):
    request_id: str
    aborted: bool


class HealthResponse(BaseModel):
    status: Literal["ok", "unhealthy", "starting"]
    instance_id: str
    engine: str

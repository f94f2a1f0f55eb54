"""OpenAI-compatible request and response bodies (the subset Shoal serves).

Requests refuse unknown fields and parameters the engine cannot honour with a
400, so nothing a client asks for is silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from infra.contract import (
    Message,
    ReasoningEffort,
    StructuredSpec,
    Tool,
    ToolCall,
    ToolChoice,
    some_tools,
    tool_choice_of,
)
from infra.errors import BadRequestError
from infra.records import Priority

MAX_STOP = 8
MAX_N = 16
"""Most choices one call may ask for."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's extension: every chunk carries the usage so far."""


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON to a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a 'json_schema' response_format needs its 'json_schema' field")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: one constraint for its structured-output backend."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: None = None
    """Not served (Shoal has no tool-call parsers yet)."""


def structured_spec(structured: StructuredOutputs | None,
                    response_format: ResponseFormat | None) -> StructuredSpec | None:  # fmt: skip
    """The output constraint a request asks for: ``structured_outputs``, with
    ``response_format`` (when not ``text``) overriding its kind, as vLLM merges them."""
    fields = structured.model_dump(exclude_none=True, by_alias=True) if structured else {}
    fields.pop("structural_tag", None)
    if response_format is not None and response_format.type == "json_object":
        fields["json_object"] = True
    elif response_format is not None and response_format.json_schema is not None:
        fields["json"] = response_format.json_schema.schema_ or {}
    if not fields:
        return None
    schema = fields.pop("json", None)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise BadRequestError("'structured_outputs.json' is not valid JSON",
                                  param="structured_outputs.json") from None  # fmt: skip
        if not isinstance(schema, dict):
            raise BadRequestError("'structured_outputs.json' must be a JSON schema object",
                                  param="structured_outputs.json")  # fmt: skip
    if fields.get("json_object") is False:
        raise BadRequestError("'structured_outputs.json_object' must be true if set",
                              param="structured_outputs.json_object")  # fmt: skip
    if "choice" in fields and not fields["choice"]:
        raise BadRequestError("'structured_outputs.choice' must not be empty",
                              param="structured_outputs.choice")  # fmt: skip
    if isinstance(fields.get("grammar"), str) and not fields["grammar"].strip():
        raise BadRequestError("'structured_outputs.grammar' must not be empty",
                              param="structured_outputs.grammar")  # fmt: skip
    try:
        return StructuredSpec(json_schema=schema, **fields)
    except ValidationError as exc:
        raise BadRequestError(exc.errors()[0]["msg"], param="structured_outputs") from None


class _Sampling(BaseModel):
    """Sampling parameters shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Choices to generate: each is an instance request of its own."""
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    """Samples to draw, of which the ``n`` with the highest mean token logprob
    are returned (OpenAI's; whole responses only)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # Accepted and ignored, as OpenAI does without stored completions.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # vLLM extensions, accepted as `vllm serve` does.
    top_k: int | None = Field(default=None, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    """OpenAI's form: token ids as strings, biases in [-100, 100]."""
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    """vLLM's structured outputs: JSON schema, regex, choice or grammar."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    """vLLM's: the prompt tokens' logprobs, with this many alternatives each
    (completions: on each choice; chat: on the response)."""
    # Sent by routers (vLLM's router, SGLang) with values that ask for what
    # Shoal does anyway; any other value is refused.
    no_stop_trim: Literal[False] = False
    return_hidden_states: Literal[False] = False

    @model_validator(mode="after")
    def _check_stop(self) -> _Sampling:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("'best_of' must be greater than or equal to 'n'")  # OpenAI's rule
        if self.stream and self.samples > self.n:
            raise ValueError("'best_of' is not available when 'stream' is true")  # OpenAI's rule
        if self.temperature is not None and self.temperature < 1e-5:
            for name, count in (("n", self.n), ("best_of", self.samples)):
                if count > 1:  # vLLM's rule: greedy samples would all be the same
                    raise ValueError(f"{name} must be 1 when using greedy sampling, got {count}")
        if self.stream and self.prompt_logprobs:
            raise ValueError("'prompt_logprobs' are not available when 'stream' is true")  # vLLM's
        limit = self.token_limit
        if limit is not None and self.min_tokens > limit:
            raise ValueError("'min_tokens' must not exceed the token limit ('max_tokens')")
        return self

    @property
    def samples(self) -> int:
        """Sequences to generate: ``best_of``, else ``n``."""
        return self.best_of or self.n

    @property
    def token_limit(self) -> int | None:
        """The most output tokens asked for (None: up to the context)."""
        raise NotImplementedError

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token asked for (None: no logprobs)."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top alternatives per prompt token asked for (None: none)."""
        return self.prompt_logprobs

    @property
    def echo_text(self) -> str | None:
        """The prompt to put before each choice's text (None: no echo)."""
        return None

    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` keyed by token id (a 400 for a key that is not one)."""
        try:
            return {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise BadRequestError(
                "'logit_bias' keys must be token ids", param="logit_bias"
            ) from None

    @property
    def structured(self) -> StructuredSpec | None:
        """The output constraint asked for (None: free text)."""
        return structured_spec(self.structured_outputs, self.response_format)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = Field(default=None, validate_default=True)
    """``auto`` when tools are given without one."""
    parallel_tool_calls: bool | None = None

    _some_tools = field_validator("tools")(some_tools)

    @field_validator("tool_choice")
    @classmethod
    def _fits_the_tools(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        return tool_choice_of(info.data.get("tools"), choice)

    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    continue_final_message: Literal[False] = False
    reasoning_effort: ReasoningEffort | None = None
    """Given to the chat template; ``none`` turns thinking off (vLLM's rule)."""
    include_reasoning: bool = True
    """False: where a reasoning parser runs, the reasoning (and the
    logprobs, which would show it) is left out."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (vLLM's extension)."""
    # SGLang's reasoning switches, with the values that ask for what Shoal does.
    separate_reasoning: Literal[True] = True
    stream_reasoning: Literal[True] = True

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    """Put the prompt before each choice's text (and, with ``logprobs``, the
    prompt tokens' logprobs before the output's)."""
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _echo_text(self) -> CompletionRequest:
        if self.echo and not isinstance(self.prompt, str):
            raise ValueError("'echo' needs a text prompt")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """As vLLM: ``prompt_logprobs``, else with ``echo`` the ``logprobs``."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    @property
    def echo_text(self) -> str | None:
        return self.prompt if self.echo and isinstance(self.prompt, str) else None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    """Where a reasoning parser ran: how many completion tokens were reasoning."""


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    reasoning: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """The model's reasoning, where a reasoning parser found some (vLLM's field)."""
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list, exclude_if=lambda v: not v)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class PromptTokenLogprob(BaseModel):
    """vLLM's form of one alternative at a prompt position."""

    logprob: float
    rank: int | None
    decoded_token: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    """vLLM's extension, when asked for: per prompt token (None for the first)."""


class ChatFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChatToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChatFunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    reasoning: str | None = Field(default=None, exclude_if=lambda v: v is None)
    content: str | None = None
    tool_calls: list[ChatToolCallDelta] = Field(default_factory=list, exclude_if=lambda v: not v)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    """vLLM's extension, when asked for: per prompt token (None for the first)."""


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shoal"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def shoal_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shoal")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


PRIORITY_HEADER = "X-Request-Priority"
"""Shoal's per-request priority header: ``high``, ``normal`` (default) or ``low``."""


def priority_from_header(header: str | None) -> Priority:
    """The priority a request asks for; a 400 for anything but the three names."""
    if header is None or not header.strip():
        return Priority.NORMAL
    try:
        return Priority(header.strip().lower())
    except ValueError:
        raise BadRequestError(
            f"{PRIORITY_HEADER} must be one of high, normal, low (got {header!r})",
            param=PRIORITY_HEADER,
        ) from None


class TokenizeCompletionRequest(BaseModel):
    """``POST /tokenize`` with a prompt (vLLM's form)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: Literal[False] = False


class TokenizeChatRequest(BaseModel):
    """``POST /tokenize`` with chat messages, rendered by the model's template."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: Literal[True] = True
    add_special_tokens: Literal[False] = False
    return_token_strs: Literal[False] = False


TokenizeRequest = TokenizeChatRequest | TokenizeCompletionRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
    """Shoal's version."""
    engine: str | None = None
    """The engine's kind and version on an instance (``vllm 0.32.0``)."""

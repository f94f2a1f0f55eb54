"""OpenAI requests to instance requests, instance chunks to OpenAI bodies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import ValidationError

from infra.contract import (
    GenerateChunk,
    GenerateRequest,
    ParsedMessage,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
)
from infra.errors import BadRequestError
from infra.openai_protocol.models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatFunctionDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatToolCallDelta,
    ChatTopLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionTokensDetails,
    PromptTokenLogprob,
    Usage,
)
from infra.records import Priority


def to_generate(
    req: ChatCompletionRequest | CompletionRequest, request_id: str, priority: Priority,
    *, migratable: bool = False,
) -> GenerateRequest:  # fmt: skip
    common = dict(
        request_id=request_id,
        model=req.model,
        max_tokens=req.token_limit,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_tokens=req.min_tokens,
        seed=req.seed,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        min_p=req.min_p,
        include_stop_str_in_output=req.include_stop_str_in_output,
        truncate_prompt_tokens=req.truncate_prompt_tokens,
        stop_token_ids=req.stop_token_ids or [],
        logit_bias=req.logit_bias_ids(),
        # best_of ranks its samples by their tokens' logprobs, asked for or not
        logprobs=0 if req.num_logprobs is None and req.samples > req.n else req.num_logprobs,
        prompt_logprobs=req.num_prompt_logprobs,
        structured=req.structured,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        priority=priority,
        stream=True,
        migratable=migratable,
    )
    try:
        if isinstance(req, ChatCompletionRequest):
            return GenerateRequest(messages=req.messages, tools=req.tools,  # type: ignore[arg-type]
                                   tool_choice=req.tool_choice,
                                   parallel_tool_calls=req.parallel_tool_calls,
                                   reasoning_effort=req.reasoning_effort,
                                   include_reasoning=req.include_reasoning,
                                   chat_template_kwargs=req.chat_template_kwargs,
                                   **common)  # fmt: skip
        return GenerateRequest(prompt=req.prompt, **common)  # type: ignore[arg-type]
    except ValidationError as exc:  # a rule of the instance's contract: still the client's 400
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequestError(first["msg"], param=param) from None


def openai_usage(prompt: int, completion: int, reasoning: int | None = None) -> Usage:
    """OpenAI's usage; ``reasoning`` where a reasoning parser counted it."""
    details = None if reasoning is None else CompletionTokensDetails(reasoning_tokens=reasoning)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion, completion_tokens_details=details)  # fmt: skip


def usage_of(chunk: GenerateChunk) -> Usage | None:
    if (u := chunk.usage) is None:
        return None
    return openai_usage(u.prompt_tokens, u.completion_tokens, u.reasoning_tokens)


def running_usage(chunk: GenerateChunk) -> Usage | None:
    """The usage so far at ``chunk``: its final usage, or its running counts."""
    if chunk.usage is not None:
        return usage_of(chunk)
    if chunk.num_prompt_tokens is None or chunk.num_output_tokens is None:
        return None
    return openai_usage(chunk.num_prompt_tokens, chunk.num_output_tokens,
                        chunk.num_reasoning_tokens)  # fmt: skip


def chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    """OpenAI's chat form of token logprobs. As on vLLM, a position's own token
    leads its alternatives (it differs from the most likely one where the
    sampling was not greedy or a bias moved it), then the most likely others."""
    if entries is None:
        return None
    return ChatLogprobs(content=[ChatTokenLogprob(
        token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
        top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob,
                                     bytes=list(t.token.encode())) for t in _own_first(e)],
    ) for e in entries])  # fmt: skip


def _own_first(entry: TokenLogprob) -> list[TopLogprob]:
    own = TopLogprob(token_id=entry.token_id, token=entry.token, logprob=entry.logprob)
    others = [t for t in entry.top if t.token_id != entry.token_id]
    return [own, *others][: len(entry.top)]


def completion_logprobs(entries: Sequence[TokenLogprob | PromptLogprob] | None,
                        offset: int) -> CompletionLogprobs | None:  # fmt: skip
    """OpenAI's completions form of token logprobs; ``offset`` is where the
    first token's text starts in the output. Each position's alternatives
    include its own token (vLLM's and OpenAI's "top n + 1"); a prompt token
    nothing predicts (the first) has neither a logprob nor alternatives."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        text_offset=offsets, token_logprobs=[e.logprob for e in entries],
        tokens=[e.token for e in entries],
        top_logprobs=[None if e.logprob is None else {e.token: e.logprob} | {
            t.token: t.logprob for t in e.top} for e in entries],
    )  # fmt: skip


def vllm_prompt_logprobs(
    entries: list[PromptLogprob] | None,
) -> list[dict[str, PromptTokenLogprob] | None] | None:
    """vLLM's ``prompt_logprobs`` (of a completion choice, of a chat response): per prompt token
    (None for the first) its own and the top alternatives, by token id."""
    if entries is None:
        return None
    return [None if e.logprob is None else {
        str(t.token_id): PromptTokenLogprob(logprob=t.logprob, rank=t.rank, decoded_token=t.token)
        for t in [TopLogprob(token_id=e.token_id, token=e.token, logprob=e.logprob,
                             rank=e.rank), *e.top]
    } for e in entries]  # fmt: skip


@dataclass
class WholeChoice:
    """One choice of a whole (non-streaming) response, gathered chunk by chunk."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[PromptLogprob] | None = None
    parsed: ParsedMessage | None = None
    """The tool-call parser's reading of the whole output (None: none ran)."""

    def add(self, chunk: GenerateChunk) -> None:
        self.texts.append(chunk.text)
        if chunk.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *chunk.logprobs]
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.prompt_logprobs = self.prompt_logprobs or chunk.prompt_logprobs
        self.parsed = chunk.parsed or self.parsed

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass(frozen=True)
class BestOf:
    """``best_of``: of the samples, the ``n`` with the highest mean token logprob."""

    n: int
    logprobs: bool
    """The client asked for logprobs (else they were only for the ranking)."""

    @classmethod
    def of(cls, req: ChatCompletionRequest | CompletionRequest) -> BestOf | None:
        """The request's ranking (None: every sample is returned)."""
        if req.samples == req.n:
            return None
        return cls(req.n, req.num_logprobs is not None)

    def pick(self, samples: list[WholeChoice]) -> list[WholeChoice]:
        """The best ``n`` (ties: the earlier sample), indexed from 0."""
        ranked = sorted(samples, key=lambda c: -_mean_logprob(c))[: self.n]
        return [replace(c, index=i, logprobs=c.logprobs if self.logprobs else None)
                for i, c in enumerate(ranked)]  # fmt: skip


def _mean_logprob(choice: WholeChoice) -> float:
    entries = choice.logprobs or []
    return sum(e.logprob for e in entries) / len(entries) if entries else float("-inf")


def chat_chunk(rid: str, created: int, model: str, chunk: GenerateChunk, first: bool,
               index: int = 0) -> ChatCompletionChunk:  # fmt: skip
    """A chat stream chunk: the text, or (where a tool-call parser ran) its
    content and pieces of tool calls."""
    role: Literal["assistant"] | None = "assistant" if first else None
    if (message := chunk.message) is None:
        delta = ChatDelta(role=role, content=chunk.text)
    else:
        delta = ChatDelta(role=role, reasoning=message.reasoning, content=message.content,
                          tool_calls=[ChatToolCallDelta(
            index=c.index, id=c.id, type="function" if c.id else None,
            function=ChatFunctionDelta(name=c.name, arguments=c.arguments),
        ) for c in message.tool_calls])  # fmt: skip
    finish = chunk.parsed.stream_finish_reason if chunk.parsed else chunk.finish_reason
    choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                             logprobs=chat_logprobs(chunk.logprobs))  # fmt: skip
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])


def chat_usage_chunk(rid: str, created: int, model: str, usage: Usage) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)


def completion_chunk(
    rid: str, created: int, model: str, chunk: GenerateChunk, offset: int = 0, index: int = 0,
    echo: str | None = None,
) -> Completion:  # fmt: skip
    """A completions stream chunk; ``echo`` (the prompt, on a choice's first
    chunk) goes before its text, and its prompt logprobs before its logprobs."""
    choice = CompletionChoice(index=index, text=(echo or "") + chunk.text,
                              finish_reason=chunk.finish_reason,
                              logprobs=_echoed_logprobs(chunk.logprobs, chunk.prompt_logprobs,
                                                        echo, offset))  # fmt: skip
    return Completion(id=rid, created=created, model=model, choices=[choice])


def _echoed_logprobs(logprobs: list[TokenLogprob] | None, prompt: list[PromptLogprob] | None,
                     echo: str | None, offset: int) -> CompletionLogprobs | None:  # fmt: skip
    if logprobs is None or echo is None or prompt is None:
        return completion_logprobs(logprobs, offset)
    return completion_logprobs([*prompt, *logprobs], offset)


def completion_usage_chunk(rid: str, created: int, model: str, usage: Usage) -> Completion:
    return Completion(id=rid, created=created, model=model, choices=[], usage=usage)


def chat_whole(rid: str, created: int, model: str, choices: list[WholeChoice],
               usage: Usage) -> ChatCompletion:  # fmt: skip
    prompt = vllm_prompt_logprobs(choices[0].prompt_logprobs) if choices else None
    return ChatCompletion(id=rid, created=created, model=model, usage=usage, choices=[
        ChatChoice(index=c.index, message=_message(c), logprobs=chat_logprobs(c.logprobs),
                   finish_reason=c.parsed.finish_reason if c.parsed else c.finish_reason)
        for c in choices
    ], prompt_logprobs=prompt)  # fmt: skip


def _message(choice: WholeChoice) -> ChatMessageOut:
    if (parsed := choice.parsed) is None:
        return ChatMessageOut(content=choice.text)
    return ChatMessageOut(reasoning=parsed.reasoning, content=parsed.content,
                          tool_calls=parsed.tool_calls)  # fmt: skip


def completion_whole(rid: str, created: int, model: str, choices: list[WholeChoice],
                     usage: Usage, echo: str | None = None) -> Completion:  # fmt: skip
    return Completion(id=rid, created=created, model=model, usage=usage, choices=[
        CompletionChoice(index=c.index, text=(echo or "") + c.text,
                         finish_reason=c.finish_reason,
                         logprobs=_echoed_logprobs(c.logprobs, c.prompt_logprobs, echo, 0),
                         prompt_logprobs=vllm_prompt_logprobs(c.prompt_logprobs))
        for c in choices
    ])  # fmt: skip

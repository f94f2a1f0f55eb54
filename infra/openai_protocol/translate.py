"""OpenAI requests to instance requests, instance chunks to OpenAI bodies."""

from __future__ import annotations

from pydantic import ValidationError

from infra.contract import GenerateChunk, GenerateRequest
from infra.errors import BadRequestError
from infra.openai_protocol.models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
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
        stop_token_ids=req.stop_token_ids or [],
        logit_bias=req.logit_bias_ids(),
        priority=priority,
        stream=True,
        migratable=migratable,
    )
    try:
        if isinstance(req, ChatCompletionRequest):
            return GenerateRequest(messages=req.messages, **common)  # type: ignore[arg-type]
        return GenerateRequest(prompt=req.prompt, **common)  # type: ignore[arg-type]
    except ValidationError as exc:  # a rule of the instance's contract: still the client's 400
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequestError(first["msg"], param=param) from None


def usage_of(chunk: GenerateChunk) -> Usage | None:
    if chunk.usage is None:
        return None
    return Usage(**chunk.usage.model_dump())


def running_usage(chunk: GenerateChunk) -> Usage | None:
    """The usage so far at ``chunk``: its final usage, or its running counts."""
    if chunk.usage is not None:
        return usage_of(chunk)
    if chunk.num_prompt_tokens is None or chunk.num_output_tokens is None:
        return None
    return Usage(prompt_tokens=chunk.num_prompt_tokens, completion_tokens=chunk.num_output_tokens,
                 total_tokens=chunk.num_prompt_tokens + chunk.num_output_tokens)  # fmt: skip


def chat_chunk(
    rid: str, created: int, model: str, chunk: GenerateChunk, first: bool
) -> ChatCompletionChunk:
    delta = ChatDelta(role="assistant" if first else None, content=chunk.text)
    choice = ChatChunkChoice(delta=delta, finish_reason=chunk.finish_reason)
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])


def chat_usage_chunk(rid: str, created: int, model: str, usage: Usage) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)


def completion_chunk(rid: str, created: int, model: str, chunk: GenerateChunk) -> Completion:
    choice = CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason)
    return Completion(id=rid, created=created, model=model, choices=[choice])


def completion_usage_chunk(rid: str, created: int, model: str, usage: Usage) -> Completion:
    return Completion(id=rid, created=created, model=model, choices=[], usage=usage)


def chat_whole(
    rid: str, created: int, model: str, text: str, finish: str | None, usage: Usage
) -> ChatCompletion:
    choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish)
    return ChatCompletion(id=rid, created=created, model=model, choices=[choice], usage=usage)


def completion_whole(
    rid: str, created: int, model: str, text: str, finish: str | None, usage: Usage
) -> Completion:
    choice = CompletionChoice(text=text, finish_reason=finish)
    return Completion(id=rid, created=created, model=model, choices=[choice], usage=usage)

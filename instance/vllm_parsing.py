"""vLLM's reasoning and tool-call parsers behind :class:`instance.output_parsing.OutputParsing`.

The parser is the one ``vllm serve --reasoning-parser R --enable-auto-tool-choice
--tool-call-parser T`` runs (``vllm.parser.ParserManager``: one parser for
both), over vLLM's own request model, so its constraints (``required`` and
named tool choices: JSON to the tools' schema), its streaming split and its
final reading are vLLM's. vLLM is imported lazily.
"""

from __future__ import annotations

import uuid
from typing import Any

from infra.contract import (
    FunctionCall,
    GenerateRequest,
    MessageDelta,
    NamedToolChoice,
    ParsedMessage,
    StructuredSpec,
    ToolCall,
    ToolCallDelta,
)
from infra.errors import BadRequestError


class VllmOutputParsing:
    """Sessions of vLLM's parsers ``tool_parser`` and ``reasoning_parser``
    (either may be None, not both) over the engine's tokenizer."""

    def __init__(self, tokenizer: Any, model_config: Any, *, tool_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:  # fmt: skip
        from vllm.parser.parser_manager import ParserManager

        names = dict(tool_parser_name=tool_parser, reasoning_parser_name=reasoning_parser,
                     model_name=model_config.model)  # fmt: skip
        parser_cls = ParserManager.get_parser(**names, enable_auto_tools=tool_parser is not None,
                                              tokenizer=tokenizer)  # fmt: skip
        if parser_cls is None:  # pragma: no cover - vLLM raises for an unknown name
            raise ValueError(f"no parser for {names}")
        ParserManager.validate_parser_tokenizer(parser_cls, tokenizer, **names)
        self.tools, self.reasoning = tool_parser is not None, reasoning_parser is not None
        self._cls, self._tokenizer, self._model_config = parser_cls, tokenizer, model_config

    def _parser(self, request: Any) -> Any:
        kwargs = request.build_chat_params(None, "auto").chat_template_kwargs
        return self._cls(self._tokenizer, request.tools, chat_template_kwargs=kwargs,
                         model_config=self._model_config)  # fmt: skip

    def session(self, request: GenerateRequest, prompt_token_ids: list[int]) -> _Session:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        assert request.messages is not None
        body: dict[str, Any] = {
            "model": request.model or "",
            "messages": [m.model_dump(exclude_none=True) for m in request.messages],
            "include_reasoning": request.include_reasoning,
            "reasoning_effort": request.reasoning_effort,
            "chat_template_kwargs": request.chat_template_kwargs,
        }
        if request.tools is not None:
            body |= {"tools": [t.model_dump(exclude_none=True) for t in request.tools],
                     "tool_choice": _dumped(request.tool_choice),
                     "parallel_tool_calls": request.parallel_tool_calls}  # fmt: skip
        try:
            theirs = ChatCompletionRequest.model_validate(body)
        except ValueError as exc:
            param = "tools" if request.tools else "messages"
            raise BadRequestError(f"vLLM's output parsing refused the request: {exc}",
                                  param=param) from None  # fmt: skip
        parser = self._parser(theirs)
        theirs = parser.adjust_request(theirs)
        return _Session(self, parser, theirs, prompt_token_ids)


def _dumped(choice: object) -> object:
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


class _Session:
    def __init__(self, owner: VllmOutputParsing, parser: Any, request: Any,
                 prompt_token_ids: list[int]) -> None:  # fmt: skip
        self._owner, self._parser, self._request = owner, parser, request
        self._prompt = prompt_token_ids
        self._texts: list[str] = []
        self._token_ids: list[int] = []
        self._streamed_calls = False
        self.structured = _constraint(request)
        self.pin_reason = "tool_parser" if request.tools else "reasoning_parser"
        self.reasoning_ended = request.resolve_reasoning_ended(parser, prompt_token_ids)
        self.hides_logprobs = not request.include_reasoning
        self.engine_kwargs = (
            {"chat_template_kwargs": request.build_chat_params(None, "auto").chat_template_kwargs}
            if owner.reasoning
            else None
        )

    @property
    def _parallel(self) -> bool:
        """Whether more than one call may be returned (``parallel_tool_calls:
        false``: the first only, as vLLM keeps it)."""
        return self._request.parallel_tool_calls is not False

    @property
    def _named(self) -> bool:
        return isinstance(self._request.tool_choice, dict) or hasattr(
            self._request.tool_choice, "function"
        )

    def feed(self, text: str, token_ids: list[int], *, finished: bool) -> MessageDelta:
        self._texts.append(text)
        self._token_ids.extend(token_ids)
        delta = self._parser.parse_delta(
            delta_text=text, delta_token_ids=list(token_ids), request=self._request,
            prompt_token_ids=self._prompt, finished=finished,
        )  # fmt: skip
        if delta is None:  # nothing to show for it yet
            return MessageDelta()
        calls = [ToolCallDelta(
            index=c.index, id=c.id, name=c.function.name if c.function else None,
            arguments=c.function.arguments if c.function else None,
        ) for c in delta.tool_calls if self._parallel or c.index == 0]  # fmt: skip
        self._streamed_calls = self._streamed_calls or bool(calls)
        return MessageDelta(reasoning=delta.reasoning, content=delta.content, tool_calls=calls)

    def reasoning_tokens(self) -> int | None:
        if not self._owner.reasoning:
            return None
        return int(self._parser.count_reasoning_tokens(tuple(self._token_ids)))

    def finish(self, finish_reason: str | None) -> ParsedMessage:
        """The whole output read afresh (parsers are stateful), with vLLM's
        finish reasons: ``tool_calls`` when an ``auto`` parse found calls or a
        ``required`` output stopped; in a stream, when calls streamed (not
        named) and it stopped."""
        parser = self._owner._parser(self._request)
        reasoning, content, calls = parser.parse(
            "".join(self._texts), self._request, enable_auto_tools=self._owner.tools,
            model_output_token_ids=self._token_ids,
        )  # fmt: skip
        tool_calls = [ToolCall(id=c.id or f"chatcmpl-tool-{uuid.uuid4().hex}",
                               function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls or ()]  # fmt: skip
        if not self._parallel:
            tool_calls = tool_calls[:1]
        choice = self._request.tool_choice
        forced = self._named or choice == "required"
        called = (choice == "auto" and bool(tool_calls)) or (
            choice == "required" and finish_reason == "stop"
        )
        return ParsedMessage(
            reasoning=reasoning if self._request.include_reasoning else None,
            content=(content or "") if forced else content, tool_calls=tool_calls,
            finish_reason="tool_calls" if called else finish_reason,
            stream_finish_reason="tool_calls"
            if self._streamed_calls and not self._named and finish_reason == "stop"
            else finish_reason,
        )  # fmt: skip


def _constraint(request: Any) -> StructuredSpec | None:
    """The JSON schema ``adjust_request`` set for a required or named choice."""
    params = request.structured_outputs
    if params is None:
        return None
    if params.structural_tag is not None:
        raise BadRequestError("this tool-call parser constrains output with structural tags, "
                              "which Shoal does not serve", param="tool_choice")  # fmt: skip
    schema = params.json
    if isinstance(schema, str):
        import json

        schema = json.loads(schema)
    return StructuredSpec(json_schema=schema)

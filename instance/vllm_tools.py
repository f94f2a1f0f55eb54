"""vLLM's tool-call parsers behind :class:`instance.tool_parsing.ToolParsing`.

The parser is the one ``vllm serve --enable-auto-tool-choice
--tool-call-parser NAME`` runs (``vllm.parser.ParserManager``), over vLLM's
own request model, so its constraints (``required`` and named tool choices:
JSON to the tools' schema), its streaming split and its final reading are
vLLM's. vLLM is imported lazily.
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


class VllmToolParsing:
    """Sessions of the parser ``name`` over the engine's tokenizer."""

    def __init__(self, name: str, tokenizer: Any, model_config: Any) -> None:
        from vllm.parser.parser_manager import ParserManager

        parser_cls = ParserManager.get_parser(
            tool_parser_name=name, enable_auto_tools=True, model_name=model_config.model,
            tokenizer=tokenizer,
        )  # fmt: skip
        if parser_cls is None:  # pragma: no cover - vLLM raises for an unknown name
            raise ValueError(f"no tool-call parser {name!r}")
        ParserManager.validate_parser_tokenizer(parser_cls, tokenizer, tool_parser_name=name,
                                                model_name=model_config.model)  # fmt: skip
        self.name = name
        self._cls, self._tokenizer, self._model_config = parser_cls, tokenizer, model_config

    def _parser(self, request: Any) -> Any:
        return self._cls(self._tokenizer, request.tools, model_config=self._model_config)

    def session(self, request: GenerateRequest, prompt_token_ids: list[int]) -> _Session:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        assert request.messages is not None and request.tools is not None
        try:
            theirs = ChatCompletionRequest.model_validate({
                "model": request.model or "", "messages": [
                    m.model_dump(exclude_none=True) for m in request.messages],
                "tools": [t.model_dump(exclude_none=True) for t in request.tools],
                "tool_choice": _dumped(request.tool_choice),
                "parallel_tool_calls": request.parallel_tool_calls,
            })  # fmt: skip
        except ValueError as exc:
            raise BadRequestError(f"vLLM's tool-call parsing refused the request: {exc}",
                                  param="tools") from None  # fmt: skip
        parser = self._parser(theirs)
        theirs = parser.adjust_request(theirs)
        return _Session(self, parser, theirs, prompt_token_ids)


def _dumped(choice: object) -> object:
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


class _Session:
    def __init__(self, owner: VllmToolParsing, parser: Any, request: Any,
                 prompt_token_ids: list[int]) -> None:  # fmt: skip
        self._owner, self._parser, self._request = owner, parser, request
        self._prompt = prompt_token_ids
        self._texts: list[str] = []
        self._token_ids: list[int] = []
        self._streamed_calls = False
        self.structured = _constraint(request)

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
        if delta is None:
            return MessageDelta()
        calls = [ToolCallDelta(
            index=c.index, id=c.id, name=c.function.name if c.function else None,
            arguments=c.function.arguments if c.function else None,
        ) for c in delta.tool_calls]  # fmt: skip
        self._streamed_calls = self._streamed_calls or bool(calls)
        return MessageDelta(content=delta.content, tool_calls=calls)

    def finish(self, finish_reason: str | None) -> ParsedMessage:
        """The whole output read afresh (parsers are stateful), with vLLM's
        finish reasons: ``tool_calls`` when an ``auto`` parse found calls or a
        ``required`` output stopped; in a stream, when calls streamed (not
        named) and it stopped."""
        parser = self._owner._parser(self._request)
        _, content, calls = parser.parse(
            "".join(self._texts), self._request, enable_auto_tools=True,
            model_output_token_ids=self._token_ids,
        )  # fmt: skip
        tool_calls = [ToolCall(id=c.id or f"chatcmpl-tool-{uuid.uuid4().hex}",
                               function=FunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls or ()]  # fmt: skip
        choice = self._request.tool_choice
        forced = self._named or choice == "required"
        called = (choice == "auto" and bool(tool_calls)) or (
            choice == "required" and finish_reason == "stop"
        )
        return ParsedMessage(
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

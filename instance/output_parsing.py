"""Reasoning and tool calls in a chat request's output, as ``vllm serve`` finds them.

An instance may run vLLM's output parsers (see ``instance.vllm_parsing``): a
reasoning parser (``--reasoning-parser NAME``) for every chat request, and a
tool-call parser (``--tool-call-parser NAME`` with ``--enable-auto-tool-choice``)
for chat requests whose ``tool_choice`` asks for calls. Such a request gets an
:class:`OutputSession`: it may constrain the output (``tool_choice`` required
or named: JSON to the tools' schema), splits each chunk's text into reasoning,
content and pieces of tool calls as it streams, and reads the whole output at
the end.

The parser's state lives in this instance, so such a request is pinned here
(``Generation.pinned_by``: ``tool_parser`` or ``reasoning_parser``) and is not
continued elsewhere.
"""

from __future__ import annotations

from typing import Any, Protocol

from infra.contract import (
    GenerateRequest,
    MessageDelta,
    ParsedMessage,
    StructuredSpec,
    ToolChoice,
)
from infra.errors import BadRequestError


class OutputSession(Protocol):
    """The parser of one request's output."""

    @property
    def structured(self) -> StructuredSpec | None:
        """The output constraint the tool choice asks for (None: free text)."""

    @property
    def pin_reason(self) -> str:
        """Why the request cannot move: ``tool_parser`` or ``reasoning_parser``."""

    @property
    def reasoning_ended(self) -> bool | None:
        """For the engine's structured output: True when the output is
        constrained from its first token (reasoning is off or over in the
        prompt); None lets the engine's reasoning parser find the end."""

    @property
    def engine_kwargs(self) -> dict[str, Any] | None:
        """What the engine's reasoning parser is given (vLLM's
        ``reasoning_parser_kwargs``; None: no reasoning parser)."""

    @property
    def hides_logprobs(self) -> bool:
        """The request left reasoning out, so its logprobs are left out too
        (they would show the reasoning's tokens), as vLLM does."""

    def feed(self, text: str, token_ids: list[int], *, finished: bool) -> MessageDelta:
        """The next chunk's text and tokens, split as the parser reads them
        (empty: nothing to show for it yet)."""

    def reasoning_tokens(self) -> int | None:
        """How many of the tokens fed so far are reasoning (None: no
        reasoning parser)."""

    def finish(self, finish_reason: str | None) -> ParsedMessage:
        """The whole output as the parser reads it, and the finish reasons a
        response shows for the engine's ``finish_reason``."""


class OutputParsing(Protocol):
    """Makes an :class:`OutputSession` per chat request that needs one."""

    @property
    def tools(self) -> bool:
        """A tool-call parser runs (with auto tool choice)."""

    @property
    def reasoning(self) -> bool:
        """A reasoning parser runs (for every chat request)."""

    def session(self, request: GenerateRequest, prompt_token_ids: list[int]) -> OutputSession:
        """A session for ``request`` (a ``BadRequestError`` for tools the
        parser cannot take)."""


def needs_parser(choice: ToolChoice | None) -> bool:
    """Whether a request's ``tool_choice`` asks for tool calls to be found."""
    return choice is not None and choice != "none"


def session_for(
    parsing: OutputParsing | None, request: GenerateRequest, prompt_token_ids: list[int]
) -> OutputSession | None:
    """The parser of ``request``'s output, if it needs one: a chat request
    where a reasoning parser runs, or whose ``tool_choice`` asks for calls (a
    400 where no tool-call parser runs, as ``vllm serve``'s)."""
    wants_tools = needs_parser(request.tool_choice)
    if wants_tools and (parsing is None or not parsing.tools):
        refuse_without_parser(request.tool_choice)
    if parsing is None or request.messages is None:
        return None
    if wants_tools or parsing.reasoning:
        return parsing.session(request, prompt_token_ids)
    return None


def refuse_without_parser(choice: ToolChoice | None) -> None:
    """A 400 for a ``tool_choice`` that needs a tool-call parser on an
    instance that runs none (``vllm serve``'s answer without
    ``--tool-call-parser``); ``none`` is text with the tools shown to the
    chat template."""
    if not needs_parser(choice):
        return
    if choice == "auto":
        raise BadRequestError('"auto" tool choice needs a tool-call parser: start the instance '
                              "with --tool-call-parser and --enable-auto-tool-choice",
                              param="tool_choice")  # fmt: skip
    name = f'"{choice}"' if isinstance(choice, str) else f'function "{choice.function.name}"'  # type: ignore[union-attr]
    raise BadRequestError(f"tool_choice={name} needs a tool-call parser: start the instance "
                          "with --tool-call-parser and --enable-auto-tool-choice",
                          param="tool_choice")  # fmt: skip

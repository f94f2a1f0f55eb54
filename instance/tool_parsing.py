"""Tool calls in a chat request's output, as ``vllm serve`` finds them.

An instance may run a tool-call parser (``--tool-call-parser NAME`` with
``--enable-auto-tool-choice``, vLLM's flags and vLLM's parsers, see
``instance.vllm_tools``). Each chat request with tools then gets a
:class:`ToolSession`: it may constrain the output (``tool_choice`` required
or named: JSON to the tools' schema), splits each chunk's text into content
and pieces of tool calls as it streams, and reads the whole output at the end.

The parser's state lives in this instance, so such a request is pinned here
(``Generation.pinned_by``) and is not continued elsewhere.
"""

from __future__ import annotations

from typing import Protocol

from infra.contract import (
    GenerateRequest,
    MessageDelta,
    ParsedMessage,
    StructuredSpec,
    ToolChoice,
)
from infra.errors import BadRequestError


class ToolSession(Protocol):
    """The parser of one request's output."""

    @property
    def structured(self) -> StructuredSpec | None:
        """The output constraint the tool choice asks for (None: free text)."""

    def feed(self, text: str, token_ids: list[int], *, finished: bool) -> MessageDelta:
        """The next chunk's text and tokens, split as the parser reads them."""

    def finish(self, finish_reason: str | None) -> ParsedMessage:
        """The whole output as the parser reads it, and the finish reasons a
        response shows for the engine's ``finish_reason``."""


class ToolParsing(Protocol):
    """Makes a :class:`ToolSession` per chat request with tools."""

    def session(self, request: GenerateRequest, prompt_token_ids: list[int]) -> ToolSession:
        """A session for ``request`` (a ``BadRequestError`` for tools the
        parser cannot take)."""


def needs_parser(choice: ToolChoice | None) -> bool:
    """Whether a request's ``tool_choice`` asks for tool calls to be found."""
    return choice is not None and choice != "none"


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

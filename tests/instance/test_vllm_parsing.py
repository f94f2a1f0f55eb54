"""vLLM's output parsers behind Shoal's session protocol, in-process over the
tiny model's tokenizer (no engine): what the parity tests cannot make the
random model write, such as two tool calls in one answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.contract import GenerateRequest

pytestmark = pytest.mark.vllm

TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}},
}}]  # fmt: skip
TWO_CALLS = "[get_weather(unit='c'), get_weather(unit='f')]"
"""Two calls in the ``pythonic`` parser's format."""


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def model_config(tiny_model: Path) -> Any:
    from vllm.config import ModelConfig

    return ModelConfig(model=str(tiny_model), dtype="float32", max_model_len=2048)


def _stream(session: Any, tokenizer: Any, text: str) -> list[Any]:
    """``text`` fed token by token, as the engine streams it; the deltas' calls."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    calls = []
    for i, token in enumerate(ids):
        delta = session.feed(tokenizer.decode([token]), [token], finished=i == len(ids) - 1)
        calls += delta.tool_calls
    return calls


@pytest.mark.parametrize(("parallel", "units"), [(None, ["c", "f"]), (True, ["c", "f"]),
                                                 (False, ["c"])])  # fmt: skip
def test_parallel_tool_calls_false_keeps_the_first_call(
    tokenizer: Any, model_config: Any, parallel: bool | None, units: list[str]
) -> None:
    from instance.vllm_parsing import VllmOutputParsing

    parsing = VllmOutputParsing(tokenizer, model_config, tool_parser="pythonic")
    request = GenerateRequest.model_validate({
        "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
        "tool_choice": "auto", "parallel_tool_calls": parallel,
    })  # fmt: skip
    session = parsing.session(request, [1, 2, 3])
    streamed = _stream(session, tokenizer, TWO_CALLS)
    message = session.finish("stop")
    assert [c.function.arguments for c in message.tool_calls] == [
        f'{{"unit": "{u}"}}' for u in units
    ]
    assert sorted({c.index for c in streamed}) == list(range(len(units)))
    assert message.finish_reason == "tool_calls"


def test_reasoning_and_content_come_apart(tokenizer: Any, model_config: Any) -> None:
    from instance.vllm_parsing import VllmOutputParsing

    parsing = VllmOutputParsing(tokenizer, model_config, reasoning_parser="deepseek_r1")
    request = GenerateRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    session = parsing.session(request, [1, 2, 3])
    assert session.pin_reason == "reasoning_parser" and not session.hides_logprobs
    _stream(session, tokenizer, "<think>the fox</think>a dog")
    message = session.finish("length")
    assert (message.reasoning, message.content) == ("the fox", "a dog")
    assert session.reasoning_tokens() == len(tokenizer.encode("the fox", add_special_tokens=False))

    hidden = GenerateRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "include_reasoning": False}
    )
    session = parsing.session(hidden, [1, 2, 3])
    _stream(session, tokenizer, "<think>the fox</think>a dog")
    assert session.hides_logprobs and session.finish("stop").reasoning is None

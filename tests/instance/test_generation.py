"""What keeps a request on its instance: live migration may move a request
only if its destination can go on exactly as it would have here."""

from __future__ import annotations

from typing import Any

import pytest

from infra.contract import MessageDelta, ParsedMessage, SamplingSpec, StructuredSpec
from infra.records import Priority
from instance.engine import EngineRequest
from instance.generation import Generation
from instance.output_parsing import OutputSession


class _Parser:
    """An output parser that finds nothing (only its presence matters here)."""

    structured = None
    reasoning_ended = None
    engine_kwargs = None
    hides_logprobs = False

    def __init__(self, pin_reason: str) -> None:
        self.pin_reason = pin_reason

    def feed(self, text: str, token_ids: list[int], *, finished: bool) -> MessageDelta:
        return MessageDelta(content=text)

    def reasoning_tokens(self) -> int | None:
        return None

    def finish(self, finish_reason: str | None) -> ParsedMessage:
        return ParsedMessage(finish_reason=finish_reason, stream_finish_reason=finish_reason)


def _gen(parser: OutputSession | None = None, **sampling: Any) -> Generation:
    spec = SamplingSpec(max_tokens=8, **sampling)  # type: ignore[arg-type]
    request = EngineRequest(request_id="r", prompt_token_ids=(1, 2, 3), sampling=spec,
                            priority=Priority.NORMAL, arrival_time=0.0, parser=parser)  # fmt: skip
    return Generation(request, num_prompt_tokens=3, migratable=True)


@pytest.mark.parametrize(
    ("sampling", "pinned_by"),
    [
        ({}, None),
        ({"temperature": 0.0, "seed": 7}, None),  # greedy: the seed draws nothing
        ({"temperature": 0.8}, None),  # unseeded: any continuation is a fair sample
        ({"temperature": 0.8, "seed": 7}, "seeded_sampling"),
        ({"structured": StructuredSpec(regex="[a-z]+")}, "structured_output"),
        ({"logprobs": 2, "prompt_logprobs": 1, "repetition_penalty": 1.2}, None),
        ({"presence_penalty": 0.5}, "output_penalties"),
        ({"frequency_penalty": -0.5}, "output_penalties"),
    ],
)  # fmt: skip
def test_what_pins_a_request(sampling: dict[str, Any], pinned_by: str | None) -> None:
    gen = _gen(None, **sampling)
    assert gen.pinned_by == pinned_by
    assert gen.movable is (pinned_by is None)


@pytest.mark.parametrize("reason", ["tool_parser", "reasoning_parser"])
def test_a_request_whose_output_is_parsed_here_stays(reason: str) -> None:
    gen = _gen(_Parser(reason))
    assert gen.pinned_by == reason
    assert not gen.movable


def test_a_request_whose_caller_cannot_follow_is_not_movable() -> None:
    gen = _gen()
    gen.migratable = False
    assert gen.pinned_by is None and not gen.movable

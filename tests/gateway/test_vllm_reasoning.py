"""Differential test of reasoning: Shoal's gateway separates reasoning from
content as upstream ``vllm serve`` does, with the same reasoning parser.

Both sides run vLLM's ``deepseek_r1`` reasoning parser (``--reasoning-parser``)
over the session's tiny model, whose vocabulary has ``<think>`` and
``</think>`` (ids 320 and 321, untrained: their logit is exactly their bias)
and whose chat template honours ``enable_thinking``. The two engines do not
run at once: ``vllm serve`` answers every case first (core 1) and stops; then a
Shoal instance with the same parser (core 1, its own namespace) and a gateway
answer them, and each pair is compared as tests/gateway/parity.py describes.
The cases cover all-reasoning, reasoning then content, thinking switched off,
streams, usage with reasoning tokens, ``include_reasoning: false``, and
structured outputs behind reasoning.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra import procs
from tests.gateway.parity import (
    COLOUR_SCHEMA,
    NO_WHITESPACE,
    TIMEOUT,
    Answer,
    Case,
    ask,
    chat,
    completion,
    continuous_usage,
    finishes,
    refused,
    refused_by_shoal_only,
    same,
    start_vllm_serve,
    stop_vllm_serve,
)
from tests.helpers import start_gateway, start_worker, wait_for

pytestmark = pytest.mark.vllm

PARSER = ("--reasoning-parser", "deepseek_r1")
NAMESPACE = "reasoning-test"
END_THINKING = {"321": 0.58}
"""``</think>`` biased to win everywhere but the first position (on this
prompt the first token's logit is about 0.63, the later ones' about 0.52):
one token of reasoning, then content. (0.53-0.63 give the same split.)"""


def reasons(norm: dict[str, Any]) -> None:
    """All reasoning: the model never ends its thinking."""
    choice = norm["choices"][0]
    assert choice["reasoning"] and not choice.get("content"), norm


def reasons_then_answers(norm: dict[str, Any]) -> None:
    choice = norm["choices"][0]
    assert choice["reasoning"] and choice["content"], norm
    assert "</think>" not in choice["reasoning"] + choice["content"], norm


def nothing_shown(norm: dict[str, Any]) -> None:
    """``include_reasoning: false``: the reasoning (here, everything) is dropped,
    with its logprobs."""
    choice = norm["choices"][0]
    assert choice["reasoning"] is None and not choice["content"], norm
    assert choice["logprobs"] is None, norm


def streams_reasoning(norm: dict[str, Any]) -> None:
    continuous_usage(norm)
    assert norm["choices"][0].get("reasoning"), norm


def counts_reasoning_tokens(norm: dict[str, Any]) -> None:
    assert norm["usage"] and "reasoning_tokens" in norm["usage"], norm


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA}}
STREAM_USAGE = {"include_usage": True, "continuous_usage_stats": True}

CASES: list[Case] = [
    Case("chat", "chat", chat(max_tokens=12), reasons),
    Case("chat-usage", "chat", chat(max_tokens=12), counts_reasoning_tokens),
    Case(
        "stream",
        "chat",
        chat(max_tokens=12, stream=True, stream_options=STREAM_USAGE),
        streams_reasoning,
    ),
    Case(
        "end-thinking", "chat", chat(max_tokens=16, logit_bias=END_THINKING), reasons_then_answers
    ),
    Case(
        "end-thinking-stream",
        "chat",
        chat(max_tokens=16, logit_bias=END_THINKING, stream=True, stream_options=STREAM_USAGE),
        continuous_usage,
    ),
    Case(
        "end-thinking-logprobs",
        "chat",
        chat(max_tokens=16, logit_bias=END_THINKING, logprobs=True, top_logprobs=2),
    ),
    Case("effort-none", "chat", chat(max_tokens=12, reasoning_effort="none")),
    Case("effort-high", "chat", chat(max_tokens=12, reasoning_effort="high")),
    Case(
        "enable-thinking-false",
        "chat",
        chat(max_tokens=12, chat_template_kwargs={"enable_thinking": False}),
    ),
    Case(
        "include-reasoning-false",
        "chat",
        chat(max_tokens=12, include_reasoning=False, logprobs=True),
        nothing_shown,
    ),
    Case(
        "include-reasoning-false-stream",
        "chat",
        chat(
            max_tokens=16,
            include_reasoning=False,
            logit_bias=END_THINKING,
            stream=True,
            stream_options=STREAM_USAGE,
        ),
    ),
    Case("n2-seeded", "chat", chat(n=2, temperature=0.8, seed=7, max_tokens=12)),
    Case(
        "json-schema-while-thinking",  # the grammar waits for the reasoning to end
        "chat",
        chat(max_tokens=12, response_format=SCHEMA_FORMAT),
    ),
    Case(
        "json-schema-after-thinking",
        "chat",
        chat(
            max_tokens=32,
            response_format=SCHEMA_FORMAT,
            logit_bias={**NO_WHITESPACE, **END_THINKING},
        ),
        reasons_then_answers,
    ),
    Case("completions", "completions", completion(max_tokens=12), finishes("length", 12)),
    Case("effort-unknown", "chat", chat(reasoning_effort="extreme"), refused(400)),
    Case(
        "reserved-template-kwarg",
        "chat",
        chat(chat_template_kwargs={"tokenize": True}),
        intended_difference="vllm serve drops chat_template_kwargs its renderer reserves; "
        "Shoal refuses them with a 400 so that nothing asked for is silently ignored",
        compare=refused_by_shoal_only("tokenize"),
    ),
]


@pytest.fixture(scope="module")
def upstream(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Answer]:
    """Every case's answer from ``vllm serve`` (stopped before Shoal starts)."""
    child = start_vllm_serve(tiny_model, tmp_path_factory.mktemp("vllm-serve-r1") / "serve.log",
                             *PARSER)  # fmt: skip
    try:
        procs.wait_ready([child], timeout_s=600)
        with httpx.Client(base_url=child.base_url, timeout=TIMEOUT, trust_env=False) as client:
            return {case.name: ask(client, case.endpoint, case.body) for case in CASES}
    finally:
        stop_vllm_serve(child)


@pytest.fixture(scope="module")
def shoal(
    upstream: dict[str, Answer],
    tiny_model: Path,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[httpx.Client]:
    """A Shoal instance with the reasoning parser on core 1 (after vllm serve
    has gone), and a gateway in front of it."""
    tmp = tmp_path_factory.mktemp("shoal-r1")
    worker = start_worker(
        engine="vllm", redis_url=redis_url, namespace=NAMESPACE, log_dir=tmp,
        instance_id="vllm-r1",
        args=["--model", str(tiny_model), "--served-model-name", "tiny-llama",
              "--cpu-threads-bind", "1", "--max-num-seqs", "4", "--block-size", "32",
              "--kv-cache-bytes", str(256 * 1024 * 1024), "--max-model-len", "16384", *PARSER],
        env={"SHOAL_DTYPE": "float32", "SHOAL_HEARTBEAT_TTL_S": "2"},
    )  # fmt: skip
    gateway = None
    try:
        gateway = start_gateway(redis_url=redis_url, namespace=NAMESPACE, log_dir=tmp)
        base = gateway.base_url
        wait_for(lambda: httpx.get(base + "/readyz").json()["instances"] >= 1, timeout_s=30)
        with httpx.Client(base_url=base, timeout=TIMEOUT, trust_env=False) as client:
            yield client
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shoal_reasons_as_vllm_serve(
    case: Case, upstream: dict[str, Answer], shoal: httpx.Client
) -> None:
    theirs = upstream[case.name]
    if case.expect is not None:
        try:
            case.expect(theirs.norm)
        except Exception as exc:
            raise AssertionError(
                f"case precondition failed on vllm serve: {exc!r}\n{theirs.message!r}\n{theirs.raw}"
            ) from exc
    case.compare(theirs, ask(shoal, case.endpoint, case.body))


def test_the_table_is_well_formed() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert (c.intended_difference is None) == (c.compare is same), c.name

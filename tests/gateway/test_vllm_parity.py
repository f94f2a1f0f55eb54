"""Differential test: Shoal's gateway answers as upstream ``vllm serve`` does.

The same OpenAI request bodies (greedy unless a case says otherwise) go to
(a) upstream vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
over the session's tiny model, with the engine shape of the session's Shoal
instance where it matters for outputs (float32, block size 32, 16384 tokens of
context, 4 sequences, 256 MiB of KV cache, prefix caching, eager, seed 0, and
vLLM's ``pythonic`` tool-call parser with auto tool choice, as the session's
instance runs it), on core 1; and (b) a Shoal gateway in front of the session's
vLLM instance (``vllm_stack``, core 0). The answers are normalised and compared
as tests/gateway/parity.py describes.

:data:`CASES` is the table of what is compared. A case whose answers are meant
to differ says why in ``intended_difference`` and brings its own ``compare``;
``expect`` checks, on vllm serve's answer, that the case exercises what it
claims (a stop that really stops, a bias that really biases), so a passing case
cannot pass vacuously. Reasoning parsers: tests/gateway/test_vllm_reasoning.py.
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
    ENDPOINTS,
    EOS,
    MESSAGES,
    NO_WHITESPACE,
    PROMPT_IDS,
    TIMEOUT,
    TOOLS,
    Case,
    ask,
    best_of_sampled,
    calls_a_tool,
    chat,
    completion,
    continuous_usage,
    echoed,
    finishes,
    has_logprobs,
    one_repeated_token,
    refused,
    refused_by_shoal_only,
    same,
    start_vllm_serve,
    stop_vllm_serve,
    streamed_with_usage,
    two_choices,
)
from tests.helpers import VLLM_NAMESPACE, WorkerProcess, start_gateway, wait_for

pytestmark = pytest.mark.vllm

TOOL_PARSER = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic")
"""As the session's instance runs (tests/conftest.py)."""

CASES: list[Case] = [
    # 1. plain requests
    Case("chat", "chat", chat(max_tokens=12), finishes("length", 12)),
    Case("completions", "completions", completion(max_tokens=12), finishes("length", 12)),
    Case(
        "completions-token-ids", "completions", completion(prompt=PROMPT_IDS), finishes("length", 8)
    ),
    # 2. streaming
    Case(
        "chat-stream-continuous-usage",
        "chat",
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
        continuous_usage,
    ),
    Case(
        "completions-stream-usage",
        "completions",
        completion(stream=True, stream_options={"include_usage": True}),
        streamed_with_usage,
    ),
    # 3. logprobs
    Case("chat-logprobs-top3", "chat", chat(logprobs=True, top_logprobs=3), has_logprobs),
    Case("completions-logprobs-2", "completions", completion(logprobs=2), has_logprobs),
    # 4. sampling controls
    Case("logit-bias", "completions", completion(logit_bias={"42": 100}), one_repeated_token),
    Case("stop-token-ids", "completions", completion(stop_token_ids=[176]), finishes("stop")),
    Case("stop-strings", "completions", completion(stop=["|Q"]), finishes("stop")),
    Case(
        "min-tokens",
        "completions",
        completion(logit_bias={str(EOS): 100}, min_tokens=4),
        finishes("stop", 5),
    ),  # EOS held back for 4 tokens, then the bias wins
    Case(
        "ignore-eos",
        "completions",
        completion(logit_bias={str(EOS): 100}, ignore_eos=True),
        finishes("length", 8),
    ),
    Case("seed-sampled", "completions", completion(temperature=0.8, seed=7, max_tokens=12)),
    # 5. structured outputs
    Case(
        "response-format-json-schema",
        "chat",
        chat(
            max_tokens=16,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA},
            },
        ),
    ),
    # (The random model pads JSON with whitespace: 16 tokens may not close it.)
    Case(
        "response-format-json-object",
        "chat",
        chat(max_tokens=16, response_format={"type": "json_object"}),
    ),
    Case(
        "structured-regex",
        "completions",
        completion(structured_outputs={"regex": "[a-c]{3}"}),
        finishes("stop"),
    ),
    Case(
        "structured-choice",
        "chat",
        chat(structured_outputs={"choice": ["yes", "no"]}),
        finishes("stop"),
    ),
    # 6. n and tools
    Case("n2-greedy", "completions", completion(n=2), refused(400)),  # vLLM: greedy needs n = 1
    Case("n2-seeded", "completions", completion(n=2, temperature=0.8, seed=7), two_choices),
    Case(
        "best-of",
        "completions",
        completion(best_of=3, temperature=0.8, seed=7, ignore_eos=True),
        intended_difference="vllm serve 0.32 accepts best_of and ignores it (one sample); "
        "Shoal draws best_of samples and returns the n with the highest mean token logprob, "
        "as OpenAI's API does, and counts every sample's tokens in the usage",
        compare=best_of_sampled(3),
    ),
    Case("tools-choice-none", "chat", chat(tools=TOOLS, tool_choice="none"), finishes("length", 8)),
    # Both run vLLM's pythonic tool-call parser (--tool-call-parser pythonic).
    Case(
        "tools-choice-required",
        "chat",
        chat(
            tools=TOOLS,
            tool_choice="required",
            max_tokens=96,
            parallel_tool_calls=False,
            logit_bias=NO_WHITESPACE,
        ),
        calls_a_tool,
    ),
    Case(
        "tools-choice-required-stream",
        "chat",
        chat(
            tools=TOOLS,
            tool_choice="required",
            max_tokens=96,
            parallel_tool_calls=False,
            logit_bias=NO_WHITESPACE,
            stream=True,
        ),
        calls_a_tool,
    ),
    Case(
        "tools-choice-named",
        "chat",
        chat(
            tools=TOOLS,
            max_tokens=48,
            logit_bias=NO_WHITESPACE,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ),
        calls_a_tool,
    ),
    Case(
        "tools-choice-named-stream",
        "chat",
        chat(
            tools=TOOLS,
            max_tokens=48,
            stream=True,
            logit_bias=NO_WHITESPACE,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ),
        calls_a_tool,
    ),
    Case("tools-choice-auto-stream", "chat", chat(tools=TOOLS, tool_choice="auto", stream=True)),
    Case(
        "tools-choice-unknown-name",
        "chat",
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        refused(400),
    ),
    Case("tools-empty", "chat", chat(tools=[]), refused(400)),
    Case(
        "tool-call-conversation",
        "chat",
        chat(
            tools=TOOLS,
            tool_choice="none",
            messages=[
                *MESSAGES,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call-1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
            ],
        ),
        finishes("length", 8),
    ),
    Case("echo-logprobs", "completions", completion(echo=True, logprobs=1), echoed),
    Case("prompt-logprobs", "completions", completion(prompt_logprobs=2)),
    Case("chat-prompt-logprobs", "chat", chat(prompt_logprobs=2)),  # of the templated prompt
    Case(
        "skip-special-tokens-false",
        "completions",
        completion(logit_bias={"7": 100}, skip_special_tokens=False, max_tokens=3),
    ),
    Case("tools-choice-auto", "chat", chat(tools=TOOLS, tool_choice="auto")),
    Case("tools-default-choice", "chat", chat(tools=TOOLS)),  # default: "auto"
    # 7. bad inputs
    Case(
        "unknown-field",
        "chat",
        chat(frobnicate=1),
        intended_difference="vllm serve ignores unknown fields (a warning in its log); "
        "Shoal refuses them with a 400 so that nothing asked for is silently ignored",
        compare=refused_by_shoal_only("frobnicate"),
    ),
    Case("negative-max-tokens", "chat", chat(max_tokens=-1), refused(400)),
    Case("top-logprobs-without-logprobs", "chat", chat(top_logprobs=2), refused(400)),
    Case("prompt-logprobs-stream", "chat", chat(prompt_logprobs=1, stream=True), refused(400)),
    Case("prompt-too-long", "completions", completion(prompt="fox " * 20000), refused(400)),
    Case("unknown-model", "chat", chat(model="no-such-model"), refused(404)),
    Case("n-zero", "chat", chat(n=0), refused(400)),
    Case(
        "response-format-unknown-type", "chat", chat(response_format={"type": "xml"}), refused(400)
    ),
    Case(
        "response-format-schema-missing",
        "chat",
        chat(response_format={"type": "json_schema"}),
        refused(400),
    ),
    # 8. echo
    Case("completions-echo", "completions", completion(echo=True), echoed),
]


# -- the two sides -----------------------------------------------------------
@pytest.fixture(scope="module")
def upstream(
    tiny_model: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """``vllm serve`` on core 1 (the Shoal instance has core 0), in its own
    process group, stopped with its engine processes at the end of the module."""
    log = tmp_path_factory.mktemp("vllm-serve") / "vllm-serve.log"
    child = start_vllm_serve(tiny_model, log, *TOOL_PARSER)
    try:
        # The session's Shoal instance starts meanwhile (if no module has yet);
        # its offline reference engine, also on core 1, has exited once it is up.
        request.getfixturevalue("vllm_stack")
        procs.wait_ready([child], timeout_s=600)
        with httpx.Client(base_url=child.base_url, timeout=TIMEOUT, trust_env=False) as client:
            yield client
    finally:
        stop_vllm_serve(child)


@pytest.fixture(scope="module")
def shoal(
    vllm_stack: tuple[WorkerProcess, Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """A gateway in front of the session's vLLM instance."""
    gateway = start_gateway(
        redis_url=redis_url, namespace=VLLM_NAMESPACE, log_dir=tmp_path_factory.mktemp("gw-parity")
    )
    try:
        wait_for(
            lambda: httpx.get(gateway.base_url + "/readyz").json()["instances"] >= 1, timeout_s=30
        )
        with httpx.Client(base_url=gateway.base_url, timeout=TIMEOUT, trust_env=False) as client:
            yield client
    finally:
        gateway.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shoal_answers_as_vllm_serve(
    case: Case, upstream: httpx.Client, shoal: httpx.Client
) -> None:
    theirs = ask(upstream, case.endpoint, case.body)
    if case.expect is not None:
        try:
            case.expect(theirs.norm)
        except Exception as exc:
            raise AssertionError(
                f"case precondition failed on vllm serve: {exc!r}\n{theirs.message!r}\n{theirs.raw}"
            ) from exc
    ours = ask(shoal, case.endpoint, case.body)
    case.compare(theirs, ours)


def test_the_table_is_well_formed() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert c.endpoint in ENDPOINTS
        assert (c.intended_difference is None) == (c.compare is same), c.name

"""OpenAI bodies from instance chunks: the logprob forms of chat and
completions, and the running usage of ``continuous_usage_stats``."""

from __future__ import annotations

import pytest

from infra.contract import GenerateChunk, TokenLogprob, TopLogprob
from infra.errors import BadRequestError
from infra.openai_protocol.models import ChatCompletionRequest, CompletionRequest
from infra.openai_protocol.translate import (
    chat_logprobs,
    completion_logprobs,
    running_usage,
    to_generate,
)
from infra.records import Priority

ENTRIES = [
    TokenLogprob(token_id=5, token="Hel", logprob=-0.1,
                 top=[TopLogprob(token_id=5, token="Hel", logprob=-0.1),
                      TopLogprob(token_id=9, token="He", logprob=-2.5)]),
    TokenLogprob(token_id=7, token="lo", logprob=-0.3, top=[]),
]  # fmt: skip


def test_chat_logprobs_carry_bytes_and_alternatives() -> None:
    out = chat_logprobs(ENTRIES)
    assert out is not None and [e.token for e in out.content] == ["Hel", "lo"]
    assert out.content[0].bytes == list(b"Hel")
    assert [t.token for t in out.content[0].top_logprobs] == ["Hel", "He"]
    assert chat_logprobs(None) is None


def test_completion_logprobs_offsets_continue_from_the_text_so_far() -> None:
    out = completion_logprobs(ENTRIES, offset=10)
    assert out is not None
    assert out.text_offset == [10, 13] and out.tokens == ["Hel", "lo"]
    assert out.token_logprobs == [-0.1, -0.3]
    # each position's alternatives include its own token (vLLM's "top n + 1")
    assert out.top_logprobs == [{"Hel": -0.1, "He": -2.5}, {"lo": -0.3}]


def test_running_usage_from_the_counts_or_the_final_usage() -> None:
    chunk = GenerateChunk(request_id="r", token_ids=[1], num_prompt_tokens=4, num_output_tokens=2)
    usage = running_usage(chunk)
    assert usage is not None and (usage.prompt_tokens, usage.total_tokens) == (4, 6)
    assert running_usage(GenerateChunk(request_id="r")) is None


def test_logprob_requests_map_to_a_count_of_alternatives() -> None:
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                 logprobs=True, top_logprobs=3)  # fmt: skip
    assert to_generate(chat, "r", Priority.NORMAL).logprobs == 3
    plain = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    assert to_generate(plain, "r", Priority.NORMAL).logprobs is None
    assert to_generate(CompletionRequest(model="m", prompt="x", logprobs=0), "r",
                       Priority.NORMAL).logprobs == 0  # fmt: skip
    alone = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                  top_logprobs=2)  # fmt: skip
    with pytest.raises(BadRequestError, match="needs 'logprobs'"):
        to_generate(alone, "r", Priority.NORMAL)
    with pytest.raises(BadRequestError):  # a contract rule, still a 400
        to_generate(CompletionRequest(model="m", prompt="x", logit_bias={"5": 101}), "r",
                    Priority.NORMAL)  # fmt: skip

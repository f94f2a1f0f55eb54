"""OpenAI bodies from instance chunks: the logprob forms of chat and
completions, and the running usage of ``continuous_usage_stats``."""

from __future__ import annotations

import pytest

from infra.contract import GenerateChunk, TokenLogprob, TopLogprob
from infra.errors import BadRequestError
from infra.openai_protocol.models import ChatCompletionRequest, CompletionRequest
from infra.openai_protocol.translate import (
    BestOf,
    WholeChoice,
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


def _sample(index: int, *logprobs: float) -> WholeChoice:
    entries = [TokenLogprob(token_id=1, token="a", logprob=p) for p in logprobs]
    return WholeChoice(index, texts=[f"s{index}"], logprobs=entries)


def test_best_of_keeps_the_highest_mean_logprob_samples_reindexed() -> None:
    samples = [_sample(0, -3.0), _sample(1, -0.5, -1.5), _sample(2, -0.2), _sample(3)]
    best = BestOf(n=2, logprobs=False).pick(samples)
    assert [(c.index, c.text, c.logprobs) for c in best] == [(0, "s2", None), (1, "s1", None)]
    kept = BestOf(n=1, logprobs=True).pick(samples)
    assert kept[0].text == "s2" and kept[0].logprobs == samples[2].logprobs
    assert BestOf(n=4, logprobs=False).pick(samples)[-1].text == "s3"  # no tokens: last


def test_best_of_samples_with_logprobs_and_needs_no_ranking_when_equal_to_n() -> None:
    ranked = CompletionRequest(model="m", prompt="x", n=2, best_of=3)
    assert (ranked.samples, BestOf.of(ranked)) == (3, BestOf(n=2, logprobs=False))
    assert to_generate(ranked, "r", Priority.NORMAL).logprobs == 0
    asked = CompletionRequest(model="m", prompt="x", best_of=2, logprobs=3)
    assert to_generate(asked, "r", Priority.NORMAL).logprobs == 3
    same = CompletionRequest(model="m", prompt="x", n=2, best_of=2)
    assert BestOf.of(same) is None and to_generate(same, "r", Priority.NORMAL).logprobs is None
    for bad in ({"n": 3, "best_of": 2}, {"best_of": 2, "stream": True},
                {"best_of": 2, "temperature": 0}):  # fmt: skip
        with pytest.raises(ValueError, match="best_of"):
            CompletionRequest(model="m", prompt="x", **bad)

"""Through the gateway to real vLLM CPU instances: the official OpenAI SDK
(sync and async, streaming and not) gets the instance's own greedy content, and
a second instance SIGKILLed during a burst loses no request: those that had not
started are retried elsewhere, those streaming from it are replayed elsewhere
from the tokens already sent, and every client gets the uninterrupted greedy
text with exact usage, no error event."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import VLLM_NAMESPACE, WorkerProcess, start_gateway, start_worker, wait_for

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
MESSAGES: Any = [{"role": "user", "content": "The quick brown fox"}]
GREEDY: Any = {"temperature": 0.0, "max_tokens": 16, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def stack(
    vllm_stack: tuple[WorkerProcess, Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    worker = vllm_stack[0]
    gateway = start_gateway(redis_url=redis_url, namespace=VLLM_NAMESPACE,
                            log_dir=tmp_path_factory.mktemp("gw-vllm"))  # fmt: skip
    try:  # stopped even if it never sees the instance
        wait_for(lambda: httpx.get(gateway.base_url + "/readyz").json()["instances"] >= 1,
                 timeout_s=10)  # fmt: skip
        yield gateway, worker
    finally:
        gateway.stop()


def direct_text(worker: WorkerProcess, **body: Any) -> tuple[str, list[int]]:
    body = {**body, "temperature": 0.0, "max_tokens": 16, "ignore_eos": True}
    out = httpx.post(worker.base_url + "/generate", json=body, timeout=60).json()
    return out["text"], out["token_ids"]


def test_sync_sdk_chat_equals_the_instance(stack: tuple[WorkerProcess, WorkerProcess]) -> None:
    gateway, worker = stack
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
    expected, tokens = direct_text(worker, messages=MESSAGES)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert whole.choices[0].message.content == expected
    assert whole.usage is not None and whole.usage.completion_tokens == len(tokens) == 16
    usage: Any = {"include_usage": True}
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options=usage, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


async def test_async_sdk_completions_equal_the_instance(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    gateway, worker = stack
    client = openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0)
    expected, _ = direct_text(worker, prompt="Large language models")
    whole = await client.completions.create(model=MODEL, prompt="Large language models", **GREEDY)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    stream = await client.completions.create(model=MODEL, prompt="Large language models",
                                             stream=True, **GREEDY)  # fmt: skip
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == expected
    await client.close()


def test_context_overflow_is_a_400_from_the_gateway(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    gateway, _ = stack
    body = {"model": MODEL, "prompt": "fox " * 20000, "max_tokens": 4}
    resp = httpx.post(gateway.base_url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


@dataclass
class _Outcome:
    text: str = ""
    chunks: int = 0
    tokens: int = 0
    """Completion tokens in the final usage chunk (absent if the stream broke)."""
    status: int = 0
    error: bool = False
    done: bool = False


PROMPT = "Once upon a time"


async def _stream(client: httpx.AsyncClient, max_tokens: int) -> _Outcome:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    out = _Outcome()
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        out.status = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out.error = True
            elif event["choices"]:
                out.chunks += 1
                out.text += event["choices"][0]["text"]
            else:
                out.tokens = event["usage"]["completion_tokens"]
    return out


def test_vllm_sampling_extras_are_honoured(stack: tuple[WorkerProcess, WorkerProcess]) -> None:
    """``logit_bias``, ``stop_token_ids`` and ``min_p`` reach vLLM and act."""
    gateway, worker = stack
    url = gateway.base_url + "/v1/completions"
    base: Any = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8,
                 "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    _, plain = direct_text(worker, prompt="The quick brown fox")
    favourite = 42 if plain[0] != 42 else 43
    biased = httpx.post(url, json={**base, "logit_bias": {str(favourite): 100}}, timeout=60)
    direct = httpx.post(worker.base_url + "/generate", timeout=60, json={
        "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.0,
        "ignore_eos": True, "logit_bias": {str(favourite): 100}}).json()  # fmt: skip
    assert direct["token_ids"] == [favourite] * 8  # every token is the biased one
    assert biased.json()["choices"][0]["text"] == direct["text"]
    stop = plain[2]
    stopped = httpx.post(url, json={**base, "stop_token_ids": [stop]}, timeout=60).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == plain.index(stop) + 1
    # min_p keeps the greedy choice (the most likely token always passes).
    greedy_min_p = httpx.post(url, json={**base, "min_p": 0.5}, timeout=60).json()
    unbiased = httpx.post(url, json=base, timeout=60).json()
    assert greedy_min_p["choices"][0]["text"] == unbiased["choices"][0]["text"]


def test_special_tokens_show_when_asked(stack: tuple[WorkerProcess, WorkerProcess]) -> None:
    """``skip_special_tokens: false`` keeps special tokens in the text."""
    gateway, _ = stack
    url = gateway.base_url + "/v1/completions"
    end = httpx.post(gateway.base_url + "/tokenize", json={
        "model": MODEL, "prompt": "<|end|>", "add_special_tokens": False,
    }).json()["tokens"]  # fmt: skip
    assert len(end) == 1  # a special token of the tiny model
    body: Any = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 3,
                 "temperature": 0.0, "logit_bias": {str(end[0]): 100}}  # fmt: skip
    hidden = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
    shown = httpx.post(url, json={**body, "skip_special_tokens": False},
                       timeout=60).json()["choices"][0]["text"]  # fmt: skip
    assert (hidden, shown) == ("", "<|end|>" * 3)


def test_stop_strings_cut_the_text_where_vllm_does(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    gateway, worker = stack
    text, _ = direct_text(worker, prompt="The quick brown fox")
    at = next(i for i in range(1, len(text) - 1) if text.find(text[i : i + 2]) == i)
    stop = text[at : at + 2]
    body: Any = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16,
                 "temperature": 0.0, "ignore_eos": True, "stop": [stop]}  # fmt: skip
    url = gateway.base_url + "/v1/completions"
    out = httpx.post(url, json=body, timeout=60).json()["choices"][0]
    assert (out["text"], out["finish_reason"]) == (text[:at], "stop")
    kept = httpx.post(url, json={**body, "include_stop_str_in_output": True}, timeout=60).json()
    assert kept["choices"][0]["text"] == text[: at + 2]


def test_echo_and_prompt_logprobs(stack: tuple[WorkerProcess, WorkerProcess]) -> None:
    """``echo`` puts the prompt before the text (and its tokens' logprobs
    before the output's); ``prompt_logprobs`` gives vLLM's per-token dicts."""
    gateway, worker = stack
    url = gateway.base_url + "/v1/completions"
    prompt = "The quick brown fox"
    expected, tokens = direct_text(worker, prompt=prompt)
    prompt_ids = httpx.post(gateway.base_url + "/tokenize", json={
        "model": MODEL, "prompt": prompt, "add_special_tokens": False,
    }).json()["tokens"]  # fmt: skip
    body: Any = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
                 "ignore_eos": True, "echo": True, "logprobs": 2}  # fmt: skip
    resp = httpx.post(url, json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    whole = resp.json()["choices"][0]
    assert whole["text"] == prompt + expected
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) + len(tokens)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None and v <= 0.0 for v in lp["token_logprobs"][1:])
    assert len(whole["prompt_logprobs"]) == len(prompt_ids) and whole["prompt_logprobs"][0] is None
    for token_id, position in zip(prompt_ids[1:], whole["prompt_logprobs"][1:], strict=True):
        assert str(token_id) in position  # the prompt token's own, beside the top 2
        assert {e["rank"] for e in position.values()} >= {1, 2}
    streamed = httpx.post(url, json={**body, "stream": True}, timeout=60)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert "".join(e["choices"][0]["text"] for e in events) == prompt + expected
    tokens_streamed = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    assert tokens_streamed == lp["tokens"]
    only = httpx.post(url, json={**body, "echo": False, "logprobs": None, "prompt_logprobs": 1},
                      timeout=60).json()["choices"][0]  # fmt: skip
    assert only["text"] == expected and only["logprobs"] is None
    assert len(only["prompt_logprobs"]) == len(prompt_ids)


def test_logprobs_come_from_vllm_in_openai_form(stack: tuple[WorkerProcess, WorkerProcess]) -> None:
    """Greedy: every sampled token is its position's most likely one."""
    gateway, worker = stack
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
    expected, tokens = direct_text(worker, messages=MESSAGES)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True,
                                          top_logprobs=3, **GREEDY)  # fmt: skip
    assert chat.choices[0].message.content == expected
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(tokens) == 16
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, stream=True, **GREEDY)
        if c.choices and c.choices[0].logprobs is not None]  # fmt: skip
    assert sum(len(lp.content or []) for lp in streamed) == 16
    out = httpx.post(gateway.base_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 2}).json()["choices"][0]["logprobs"]  # fmt: skip
    assert len(out["tokens"]) == len(out["token_logprobs"]) == 8
    assert out["text_offset"] == sorted(out["text_offset"]) and out["text_offset"][0] == 0
    assert all(1 <= len(top) <= 2 for top in out["top_logprobs"])
    bad = httpx.post(gateway.base_url + "/v1/chat/completions",
                     json={"model": MODEL, "messages": MESSAGES, "top_logprobs": 2})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


SCHEMA: Any = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                "size": {"type": "integer"}}, "required": ["colour", "size"],
                "additionalProperties": False}  # fmt: skip


def test_structured_outputs_constrain_vllm(stack: tuple[WorkerProcess, WorkerProcess]) -> None:
    """JSON schema, JSON object, regex and choice through vLLM's backend; a
    constraint it cannot compile is the client's 400."""
    gateway, _ = stack
    chat, text = gateway.base_url + "/v1/chat/completions", gateway.base_url + "/v1/completions"
    # (The random model loves whitespace, which JSON allows anywhere: bias it out.)
    tokenize = gateway.base_url + "/tokenize"
    blank = {str(t): -100 for ws in ("\n", " ", "\t") for t in httpx.post(tokenize, json={
        "model": MODEL, "prompt": ws, "add_special_tokens": False}).json()["tokens"]}  # fmt: skip
    base: Any = {"model": MODEL, "messages": MESSAGES, "temperature": 0.0, "max_tokens": 48,
                 "logit_bias": blank}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    out = httpx.post(chat, json={**base, "response_format": fmt}, timeout=60).json()
    thing = json.loads(out["choices"][0]["message"]["content"])
    assert set(thing) == {"colour", "size"} and thing["colour"] in {"red", "green", "blue"}
    assert isinstance(thing["size"], int)
    streamed = "".join(
        event["choices"][0]["delta"].get("content") or ""
        for event in sse(httpx.post(chat, json={**base, "response_format": fmt, "stream": True},
                                    timeout=60))
        if event.get("choices")
    )  # fmt: skip
    assert json.loads(streamed) == thing
    obj = httpx.post(chat, json={**base, "response_format": {"type": "json_object"}}, timeout=60)
    assert obj.status_code == 200, obj.text
    prompt: Any = {"model": MODEL, "prompt": "The quick brown fox", "temperature": 0.0,
                   "max_tokens": 16}  # fmt: skip
    regex = httpx.post(text, json={**prompt, "structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}},
                       timeout=60).json()["choices"][0]  # fmt: skip
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", regex["text"]) and regex["finish_reason"] == "stop"
    choice = httpx.post(text, json={**prompt, "structured_outputs": {"choice": ["yes", "no"]}},
                        timeout=60).json()["choices"][0]  # fmt: skip
    assert choice["text"] in {"yes", "no"}
    for bad in ({"structured_outputs": {"regex": "("}},
                {"structured_outputs": {"regex": "a", "choice": ["a"]}},
                {"structured_outputs": {"json": "{not json"}},
                {"response_format": {"type": "json_schema"}}):  # fmt: skip
        refused = httpx.post(text, json={**prompt, **bad}, timeout=60)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["type"] == "invalid_request_error"


def sse(response: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: {")]  # fmt: skip


def test_a_structured_request_is_pinned_to_its_instance(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """Its grammar lives in this engine: live migration may not move it (a
    drain waits for it), and it is counted."""
    gateway, worker = stack
    body: Any = {"model": MODEL, "prompt": "The quick brown fox", "temperature": 0.0,
                 "max_tokens": 400, "stream": True, "ignore_eos": True,
                 "structured_outputs": {"regex": "[a-z]{400}"}}  # fmt: skip
    with httpx.stream("POST", gateway.base_url + "/v1/completions", json=body,
                      timeout=120) as response:  # fmt: skip
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        rid = json.loads(first[6:])["id"]
        running = httpx.get(worker.base_url + "/requests").json()
        mine = [r for r in running if r["request_id"] == rid]
        assert mine and mine[0]["migratable"] is False
        refused = httpx.post(worker.base_url + "/migrate", json={
            "destination": "http://127.0.0.1:9", "request_ids": [rid]})  # fmt: skip
        assert refused.status_code == 400 and "not migratable" in refused.text
        rest = "".join(lines)
    assert rest.rstrip().endswith("data: [DONE]")
    metrics = httpx.get(worker.base_url + "/metrics").text
    assert re.search(
        r'shoal_instance_unmigratable_requests_total\{reason="structured_output"\} '
        r"[1-9]",
        metrics,
    )


def test_n_seeded_choices_are_seeded_as_vllm_seeds_them(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """Choice ``i`` of a call seeded ``s`` is the call seeded ``s + i``."""
    gateway, _ = stack
    url = gateway.base_url + "/v1/completions"
    body: Any = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8,
                 "temperature": 0.9, "seed": 11, "ignore_eos": True}  # fmt: skip
    both = httpx.post(url, json={**body, "n": 2}, timeout=60).json()
    alone = [httpx.post(url, json={**body, "seed": 11 + i}, timeout=60).json() for i in (0, 1)]
    assert [c["text"] for c in both["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert both["choices"][0]["text"] != both["choices"][1]["text"]
    assert both["usage"]["completion_tokens"] == 16


def test_best_of_returns_the_samples_with_the_highest_mean_logprob(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """``best_of`` 3 draws the call's three seeded samples (those of ``n`` 3)
    and returns the two whose tokens have the highest mean logprob, in that
    order, without logprobs unless asked; the usage counts every sample."""
    gateway, _ = stack
    url = gateway.base_url + "/v1/completions"
    body: Any = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8,
                 "temperature": 1.0, "seed": 5}  # fmt: skip
    samples = httpx.post(url, json={**body, "n": 3, "logprobs": 0}, timeout=60).json()
    mean = {c["text"]: statistics.fmean(c["logprobs"]["token_logprobs"])
            for c in samples["choices"]}  # fmt: skip
    assert len(mean) == 3, mean  # three different samples, so the ranking means something
    best = httpx.post(url, json={**body, "n": 2, "best_of": 3}, timeout=60).json()
    assert [c["text"] for c in best["choices"]] == sorted(mean, key=mean.__getitem__)[::-1][:2]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])
    assert best["usage"] == samples["usage"]
    asked = httpx.post(url, json={**body, "best_of": 3, "logprobs": 1}, timeout=60).json()
    (top,) = asked["choices"]
    assert top["text"] == max(mean, key=mean.__getitem__)
    assert statistics.fmean(top["logprobs"]["token_logprobs"]) == pytest.approx(mean[top["text"]])


def test_tokenize_through_the_gateway_uses_the_model_tokenizer(
    stack: tuple[WorkerProcess, WorkerProcess],
) -> None:
    gateway, worker = stack
    _, tokens = direct_text(worker, prompt="The quick brown fox")
    text = httpx.post(gateway.base_url + "/detokenize",
                      json={"model": MODEL, "tokens": tokens}).json()["prompt"]  # fmt: skip
    again = httpx.post(gateway.base_url + "/tokenize", json={"model": MODEL, "prompt": text,
                       "add_special_tokens": False}).json()  # fmt: skip
    assert again["count"] == len(again["tokens"]) and again["max_model_len"] > 0
    back = httpx.post(worker.base_url + "/detokenize",
                      json={"model": MODEL, "tokens": again["tokens"]}).json()  # fmt: skip
    assert back["prompt"] == text


def test_instance_sigkilled_during_a_burst(
    stack: tuple[WorkerProcess, WorkerProcess], tiny_model: Path, redis_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    gateway, survivor = stack
    references = {n: _direct(survivor, n) for n in (256, 16)}
    victim = start_worker(
        engine="vllm", redis_url=redis_url, namespace=VLLM_NAMESPACE, log_dir=tmp_path,
        instance_id="vllm-victim",
        args=["--model", str(tiny_model), "--served-model-name", MODEL,
              "--cpu-threads-bind", "1", "--max-num-seqs", "2", "--block-size", "32",
              "--kv-cache-bytes", str(128 * 1024 * 1024), "--max-model-len", "4096"],
        env={"SHOAL_DTYPE": "float32", "SHOAL_HEARTBEAT_TTL_S": "30"},
    )  # fmt: skip
    try:
        wait_for(lambda: httpx.get(gateway.base_url + "/readyz").json()["instances"] >= 2,
                 timeout_s=10)  # fmt: skip

        def victim_streaming_with_a_queue() -> bool:
            running = httpx.get(victim.base_url + "/requests").json()
            load = httpx.get(victim.base_url + "/load").json()
            return any(r["num_output"] >= 8 for r in running) and load["num_waiting"] >= 1

        async def burst() -> list[_Outcome]:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=300) as ac:
                before = [asyncio.create_task(_stream(ac, 256)) for _ in range(12)]
                await asyncio.to_thread(wait_for, victim_streaming_with_a_queue,
                                        timeout_s=120, interval_s=0.02)  # fmt: skip
                victim.kill()
                after = [asyncio.create_task(_stream(ac, 16)) for _ in range(6)]
                return await asyncio.wait_for(asyncio.gather(*before, *after), 600)

        outcomes = asyncio.run(burst())
    finally:
        victim.stop()
    for out in outcomes:
        assert out.status == 200 and out.done and not out.error, out  # nothing lost or broken
        assert out.tokens in references, out
        assert out.text == references[out.tokens], out  # the uninterrupted greedy text
    metrics = httpx.get(gateway.base_url + "/metrics").text
    assert re.search(r"shoal_gateway_replays_total [1-9]", metrics)  # the victim's streams
    assert re.search(
        r'shoal_gateway_dispatch_decisions_total\{instance="vllm-victim"\} [1-9]', metrics
    )


def _direct(worker: WorkerProcess, max_tokens: int) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    out = httpx.post(worker.base_url + "/generate", json=body, timeout=120).json()
    assert len(out["token_ids"]) == max_tokens
    return str(out["text"])

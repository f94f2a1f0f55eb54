"""The official OpenAI SDK (sync and async, streaming and not) through the
gateway to a real vLLM CPU instance: greedy content equals the instance's own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import VLLM_NAMESPACE, WorkerProcess, start_gateway, wait_for

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
    wait_for(lambda: httpx.get(gateway.base_url + "/readyz").json()["instances"] >= 1,
             timeout_s=10)  # fmt: skip
    yield gateway, worker
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

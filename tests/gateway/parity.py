"""The machinery of the differential tests against upstream ``vllm serve``
(tests/gateway/test_vllm_parity.py, tests/gateway/test_vllm_reasoning.py).

A case's request body goes to both sides; each answer is normalised (ids,
``created``, ``system_fingerprint`` and the fields either side adds beyond
OpenAI's dropped) into an :class:`Answer` and the two compared: status code;
the error ``type`` for errors; for successes every choice's content, reasoning,
``finish_reason``, tool calls (name and arguments), logprobs (tokens, bytes,
values to 1e-3) and the usage (with its reasoning tokens). Streams are
reassembled (content and reasoning concatenated, the final usage chunk,
``[DONE]``) and the reassembled answers compared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from infra import procs
from tests.helpers import free_port, wait_for

MODEL = "tiny-llama"
MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The quick brown fox"},
]
PROMPT = "The quick brown fox"
PROMPT_IDS = [5, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
EOS = 1
"""The tiny model's ``</s>``."""
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"enum": ["c", "f"]}},
                "required": ["unit"],
            },
        },
    }
]
NO_WHITESPACE = {str(t): -100 for t in (205, 206, 207, 208, 209, 224, 225, 226, 227, 228)}
"""The tiny model's whitespace tokens, biased out: the random model loves the
whitespace JSON allows anywhere, and would not close a constrained call."""
COLOUR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["colour"],
}
REL = 1e-3
"""Relative tolerance of logprob values (two engines, same float32 weights)."""
TIMEOUT = httpx.Timeout(180.0, connect=10.0)
"""A bound on each request (the machine may be busy with other runs)."""

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
VLLM_ERROR_TYPES = {
    "BadRequestError": "invalid_request_error",
    "Bad Request": "invalid_request_error",
    "NotFoundError": "not_found_error",
}
"""An intended difference: vLLM names an error's ``type`` after its exception
class (or HTTP reason); Shoal uses OpenAI's types. Compared through this map."""


def chat(**extra: Any) -> dict[str, Any]:
    """A greedy chat body: the case's fields over the common ones."""
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0.0, **extra}


def completion(**extra: Any) -> dict[str, Any]:
    """A greedy text-completion body: the case's fields over the common ones."""
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, **extra}


# -- answers, normalised -----------------------------------------------------
@dataclass
class Answer:
    """One side's answer to a case: the normalised form that is compared, and
    what the failure message shows besides (error message, the raw start)."""

    norm: dict[str, Any]
    message: str | None
    raw: str


def ask(client: httpx.Client, endpoint: str, body: dict[str, Any]) -> Answer:
    path = ENDPOINTS[endpoint]
    if body.get("stream"):
        with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                return _whole(resp, endpoint)
            lines = list(resp.iter_lines())
        return _reassembled(lines, endpoint)
    return _whole(client.post(path, json=body), endpoint)


def _whole(resp: httpx.Response, endpoint: str) -> Answer:
    raw = resp.text
    try:
        body = resp.json()
    except ValueError:
        return Answer({"status": resp.status_code, "not_json": raw[:200]}, None, raw[:600])
    if resp.status_code != 200 or "error" in body:
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        kind = error.get("type")
        return Answer(
            {"status": resp.status_code, "error_type": VLLM_ERROR_TYPES.get(str(kind), kind)},
            error.get("message"),
            raw[:600],
        )
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    norm = {
        "status": resp.status_code,
        "object": body.get("object"),
        "model": body.get("model"),
        "choices": [_chat_choice(c) if endpoint == "chat" else _text_choice(c) for c in choices],
        "usage": _usage(body.get("usage")),
    }
    if endpoint == "chat":  # vLLM's: on the response, not on a choice
        norm["prompt_logprobs"] = body.get("prompt_logprobs")
    return Answer(norm, None, raw[:600])


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    norm = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    details = usage.get("completion_tokens_details")
    if details:  # where a reasoning parser ran
        norm["reasoning_tokens"] = details.get("reasoning_tokens")
    return norm


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message") or {}
    calls = message.get("tool_calls") or []
    logprobs = choice.get("logprobs")
    return {
        "index": choice.get("index"),
        "role": message.get("role"),
        "content": message.get("content"),
        "reasoning": message.get("reasoning"),
        "finish_reason": choice.get("finish_reason"),
        "tool_calls": [_tool_call(c) for c in calls],  # ids normalised away
        "logprobs": None
        if logprobs is None
        else [
            {
                "token": e.get("token"),
                "bytes": e.get("bytes"),
                "logprob": e.get("logprob"),
                "top": [
                    [t.get("token"), t.get("bytes"), t.get("logprob")]
                    for t in e.get("top_logprobs") or []
                ],
            }
            for e in logprobs.get("content") or []
        ],
    }


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = call.get("function") or {}
    arguments: Any = function.get("arguments")
    # Compared as JSON where they are JSON: spacing is no difference.
    with contextlib.suppress(TypeError, ValueError):
        arguments = json.loads(arguments)
    return {"type": call.get("type"), "name": function.get("name"), "arguments": arguments}


def _text_choice(choice: dict[str, Any]) -> dict[str, Any]:
    logprobs = choice.get("logprobs")
    return {
        "index": choice.get("index"),
        "text": choice.get("text"),
        "finish_reason": choice.get("finish_reason"),
        "logprobs": None
        if logprobs is None
        else {
            k: logprobs.get(k) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        },
        "prompt_logprobs": choice.get("prompt_logprobs"),
    }


def _reassembled(lines: list[str], endpoint: str) -> Answer:
    """A 200 SSE stream reassembled: per choice the content concatenated and the
    last finish reason; the usage-only chunk's usage; ``[DONE]`` at the end;
    whether every chunk with choices carried a usage (continuous usage)."""
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    done = bool(data) and data[-1] == "[DONE]"
    events = [json.loads(d) for d in data if d != "[DONE]"]
    choices: dict[int, dict[str, Any]] = {}
    errors, final_usage, chunk_usages = [], None, []
    key = "content" if endpoint == "chat" else "text"
    for event in events:
        if "error" in event:
            errors.append((event["error"] or {}).get("type"))
            continue
        if not event.get("choices"):
            final_usage = _usage(event.get("usage"))
            continue
        chunk_usages.append(_usage(event.get("usage")))
        for c in event["choices"]:
            out = choices.setdefault(
                c.get("index", 0), {"index": c.get("index", 0), key: "", "finish_reason": None}
            )
            delta = c.get("delta") or {}
            piece = delta.get("content") if endpoint == "chat" else c.get("text")
            out[key] += piece or ""
            if delta.get("reasoning"):
                out["reasoning"] = out.get("reasoning", "") + delta["reasoning"]
            for call in delta.get("tool_calls") or ():  # pieces of tool calls, by index
                calls = out.setdefault("tool_calls", {})
                whole = calls.setdefault(call["index"], {"type": None, "name": None,
                                                         "arguments": ""})  # fmt: skip
                whole["type"] = whole["type"] or call.get("type")
                function = call.get("function") or {}
                whole["name"] = whole["name"] or function.get("name")
                whole["arguments"] += function.get("arguments") or ""
            if endpoint == "chat" and (c.get("delta") or {}).get("role"):
                out.setdefault("role", c["delta"]["role"])
            if c.get("finish_reason") is not None:
                out["finish_reason"] = c["finish_reason"]
    for out in choices.values():  # calls in order, arguments compared as JSON
        calls = out.pop("tool_calls", {})
        out["tool_calls"] = [_tool_call({"type": c["type"], "function": c})
                             for _, c in sorted(calls.items())]  # fmt: skip
    norm = {
        "status": 200,
        "done": done,
        "stream_errors": errors,
        "choices": [choices[i] for i in sorted(choices)],
        "usage": final_usage,
        "every_chunk_has_usage": bool(chunk_usages) and all(chunk_usages),
        "last_chunk_usage": chunk_usages[-1] if chunk_usages else None,
    }
    return Answer(norm, None, "\n".join(lines[:6])[:600])


# -- comparison ----------------------------------------------------------------
def differences(upstream: Any, shoal: Any, path: str = "") -> list[str]:
    """Where two normalised answers differ (floats to :data:`REL`)."""
    if isinstance(upstream, dict) and isinstance(shoal, dict):
        out = []
        for k in list(upstream) + [k for k in shoal if k not in upstream]:
            if k not in shoal or k not in upstream:
                side = "shoal" if k not in shoal else "vllm serve"
                out.append(f"{path}.{k}: missing on {side}")
            else:
                out += differences(upstream[k], shoal[k], f"{path}.{k}")
        return out
    if isinstance(upstream, list) and isinstance(shoal, list):
        out = (
            []
            if len(upstream) == len(shoal)
            else [f"{path}: {len(upstream)} items on vllm serve, {len(shoal)} on shoal"]
        )
        for i, (a, b) in enumerate(zip(upstream, shoal, strict=False)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    if (
        _number(upstream)
        and _number(shoal)
        and (isinstance(upstream, float) or isinstance(shoal, float))
    ):
        if math.isclose(upstream, shoal, rel_tol=REL, abs_tol=1e-6):
            return []
    elif upstream == shoal:
        return []
    return [f"{path or '.'}: vllm serve {upstream!r} != shoal {shoal!r}"]


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def same(upstream: Answer, shoal: Answer) -> None:
    """The default comparison: the normalised answers are equal."""
    diffs = differences(upstream.norm, shoal.norm)
    assert not diffs, "\n".join([*diffs, *_messages(upstream, shoal)])


def _messages(upstream: Answer, shoal: Answer) -> list[str]:
    return [
        f"vllm serve message: {upstream.message!r}",
        f"shoal message: {shoal.message!r}",
        f"vllm serve raw: {upstream.raw}",
        f"shoal raw: {shoal.raw}",
    ]


def refused_by_shoal_only(param: str) -> Callable[[Answer, Answer], None]:
    """vllm serve ignores a field it does not know (a warning in its log);
    Shoal refuses it with a 400 naming it."""

    def compare(upstream: Answer, shoal: Answer) -> None:
        assert upstream.norm["status"] == 200, _messages(upstream, shoal)
        assert shoal.norm == {"status": 400, "error_type": "invalid_request_error"}, _messages(
            upstream, shoal
        )
        assert param in (shoal.message or "") or param in shoal.raw, _messages(upstream, shoal)

    return compare


def best_of_sampled(samples: int) -> Callable[[Answer, Answer], None]:
    """vllm serve ignores ``best_of`` (one sample); Shoal draws ``samples``,
    returns the best one and counts every sample's tokens (``ignore_eos``:
    each as long as vllm serve's one)."""

    def compare(upstream: Answer, shoal: Answer) -> None:
        assert upstream.norm["status"] == shoal.norm["status"] == 200, _messages(upstream, shoal)
        assert len(upstream.norm["choices"]) == len(shoal.norm["choices"]) == 1, shoal.norm
        completion = upstream.norm["usage"]["completion_tokens"]
        assert shoal.norm["usage"]["completion_tokens"] == samples * completion, shoal.norm

    return compare


# -- what the cases must exercise on vllm serve (preconditions) -------------------
def finishes(reason: str, tokens: int | None = None) -> Callable[[dict[str, Any]], None]:
    def expect(norm: dict[str, Any]) -> None:
        assert norm["choices"][0]["finish_reason"] == reason, norm
        if tokens is not None:
            assert norm["usage"]["completion_tokens"] == tokens, norm

    return expect


def one_repeated_token(norm: dict[str, Any]) -> None:
    text = norm["choices"][0]["text"]
    assert text and text == text[0] * len(text), norm  # every token the biased one


def refused(status: int) -> Callable[[dict[str, Any]], None]:
    def expect(norm: dict[str, Any]) -> None:
        assert norm["status"] == status, norm

    return expect


def continuous_usage(norm: dict[str, Any]) -> None:
    assert norm["done"] and norm["every_chunk_has_usage"], norm
    assert norm["usage"] == norm["last_chunk_usage"], norm


def streamed_with_usage(norm: dict[str, Any]) -> None:
    assert norm["done"] and norm["usage"] is not None, norm


def calls_a_tool(norm: dict[str, Any]) -> None:
    calls = norm["choices"][0]["tool_calls"]
    assert calls and calls[0]["name"] == "get_weather", norm


def two_choices(norm: dict[str, Any]) -> None:
    assert [c["index"] for c in norm["choices"]] == [0, 1], norm


def has_logprobs(norm: dict[str, Any]) -> None:
    assert norm["choices"][0]["logprobs"], norm


def echoed(norm: dict[str, Any]) -> None:
    assert norm["choices"][0]["text"].startswith(PROMPT), norm


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: str
    """``chat`` (/v1/chat/completions) or ``completions`` (/v1/completions)."""
    body: dict[str, Any]
    expect: Callable[[dict[str, Any]], None] | None = None
    """Checked on vllm serve's normalised answer: the case tests what it says."""
    intended_difference: str | None = None
    """Why the answers are meant to differ (then ``compare`` says how)."""
    compare: Callable[[Answer, Answer], None] = same


# -- vllm serve ---------------------------------------------------------------
def vllm_serve_command(model: Path, port: int, *parsers: str) -> list[str]:
    """``vllm serve`` over the tiny model with the engine shape of a Shoal test
    instance, and the given parser flags."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # the Shoal instance's engine shape (tests/conftest.py, instance/vllm_engine.py)
        "--dtype",
        "float32",
        "--block-size",
        "32",
        "--max-model-len",
        "16384",
        "--max-num-seqs",
        "4",
        "--kv-cache-memory-bytes",
        str(256 * 1024 * 1024),
        "--enable-prefix-caching",
        "--enforce-eager",
        "--seed",
        "0",
        *parsers,
    ]


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def start_vllm_serve(model: Path, log: Path, *parsers: str) -> procs.Child:
    """``vllm serve`` on core 1 in its own process group, starting (then
    ``procs.wait_ready``; :func:`stop_vllm_serve` at the end)."""
    port = free_port()
    return procs.start_child(
        "vllm-serve",
        vllm_serve_command(model, port, *parsers),
        ready_url=f"http://127.0.0.1:{port}/health",
        log=log,
        env={"VLLM_CPU_OMP_THREADS_BIND": "1", "HF_HUB_OFFLINE": "1"},
    )


def stop_vllm_serve(child: procs.Child) -> None:
    """Stop ``vllm serve`` and wait until its engine processes are gone."""
    child.stop(grace_s=30)
    wait_for(lambda: group_gone(child.proc.pid), timeout_s=30)

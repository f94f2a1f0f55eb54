"""The gateway over real HTTP in front of sim instance workers, on a real
Valkey: the OpenAI SDK, errors, priorities, spreading, retries, disconnects."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.records import LoadReport
from tests.helpers import WorkerProcess, start_gateway, start_worker, wait_for

NAMESPACE = f"gwtest-{uuid.uuid4().hex[:6]}"
MODEL = "sim-model"
SIM_ARGS = ["--sim-speedup", "20", "--max-model-len", "1024", "--num-sim-blocks", "512",
            "--served-model-name", MODEL]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, list[WorkerProcess]]]:
    logs = tmp_path_factory.mktemp("gw")
    workers: list[WorkerProcess] = []
    gateway = None
    try:
        for name in ("sim-0", "sim-1"):
            workers.append(start_worker(engine="sim", redis_url=redis_url, namespace=NAMESPACE,
                                        log_dir=logs, instance_id=name, args=SIM_ARGS))  # fmt: skip
        gateway = start_gateway(redis_url=redis_url, namespace=NAMESPACE, log_dir=logs,
                                env={"SHOAL_MAX_BODY_BYTES": "65536"})  # fmt: skip
        wait_for(lambda: len(_models(gateway)) == 1, timeout_s=10)
        yield gateway, workers
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()


def _models(gw: WorkerProcess) -> list[str]:
    return [m["id"] for m in httpx.get(gw.base_url + "/v1/models").json()["data"]]


@pytest.fixture
def gateway(cluster: tuple[WorkerProcess, list[WorkerProcess]]) -> WorkerProcess:
    return cluster[0]


@pytest.fixture
def client(gateway: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)


def direct(worker: WorkerProcess, body: dict[str, object]) -> dict[str, object]:
    resp = httpx.post(worker.base_url + "/generate", json=body, timeout=30)
    assert resp.status_code == 200
    data: dict[str, object] = resp.json()
    return data


MESSAGES: Any = [{"role": "user", "content": "Tell me about shoals."}]


def test_sdk_chat_non_streaming_matches_the_instance(
    client: openai.OpenAI, cluster: tuple[WorkerProcess, list[WorkerProcess]]
) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    expected = direct(cluster[1][0], {"messages": MESSAGES, "max_tokens": 12})
    assert out.choices[0].message.content == expected["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.id.startswith("chatcmpl-") and out.model == MODEL


def test_sdk_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


async def test_sdk_async_completions(gateway: WorkerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="x", max_retries=0)
    whole = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8)
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    stream = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8,
                                             stream=True)  # fmt: skip
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == whole.choices[0].text
    await client.close()


def test_n_choices_are_requests_of_their_own(gateway: WorkerProcess) -> None:
    """``n`` = 3: three choices, each with its own index, role, text and
    finish; the usage counts the prompt once and every choice's output."""
    body: Any = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "n": 3}
    whole = httpx.post(gateway.base_url + "/v1/chat/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" and c["message"]["content"]
               for c in whole["choices"])  # fmt: skip
    single = httpx.post(gateway.base_url + "/v1/chat/completions",
                        json={**body, "n": 1}).json()["usage"]  # fmt: skip
    assert whole["usage"] == {"prompt_tokens": single["prompt_tokens"], "completion_tokens": 18,
                              "total_tokens": single["prompt_tokens"] + 18}  # fmt: skip
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", json=stream) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    texts: dict[int, str] = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        i = choice["index"]
        assert (choice["delta"].get("role") == "assistant") == (i not in texts)
        texts[i] = texts.get(i, "") + (choice["delta"].get("content") or "")
    assert sorted(texts) == [0, 1, 2] and all(texts.values())
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}}]  # fmt: skip


def test_a_conversation_with_tools_is_served(gateway: WorkerProcess) -> None:
    """``tool_choice: none`` with the tools, and the messages of a tool call
    and its result (an assistant message without content, a tool message)."""
    call: Any = {"id": "call-1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    messages = [*MESSAGES, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}]  # fmt: skip
    resp = httpx.post(gateway.base_url + "/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "tools": TOOLS, "tool_choice": "none",
        "max_tokens": 4})  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    orphan = httpx.post(gateway.base_url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [*MESSAGES, {"role": "tool", "content": "sunny"}]})  # fmt: skip
    assert orphan.status_code == 400, orphan.text


def test_sse_ends_with_one_done(gateway: WorkerProcess) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", gateway.base_url + "/v1/completions", json=body) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 17}, 400, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 2,
                                  "temperature": 0}, 400, None),  # greedy: one choice
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": []}, 400, "tools"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}, 400,
         "tool_choice"),  # "auto" by default: no tool-call parser runs
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
                                  "tool_choice": "required"}, 400, "tool_choice"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
                                  "tool_choice": {"type": "function", "function": {"name": "x"}}},
         400, "tool_choice"),  # not among the tools
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                  "tool_choice": "required"}, 400, "tool_choice"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": -1}, 400,
         "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "logprobs": True}, 400,
         "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 2000}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2], "echo": True}, 400, None),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {}}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 5},
         400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3, "best_of": 2}, 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2, "stream": True}, 400,
         None),  # the best are known only at the end
        ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2, "temperature": 0}, 400,
         None),  # greedy samples would all be the same
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    gateway: WorkerProcess, path: str, body: dict[str, object], status: int, param: str | None
) -> None:
    resp = httpx.post(gateway.base_url + path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param


def test_malformed_oversized_and_bad_priority(gateway: WorkerProcess) -> None:
    url = gateway.base_url + "/v1/chat/completions"
    resp = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    resp = httpx.post(url, content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    resp = httpx.post(url, json=body, headers={"X-Request-Priority": "urgent"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "X-Request-Priority"


def test_priority_is_clamped_and_returned(gateway: WorkerProcess) -> None:
    url = gateway.base_url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(url, json=body).headers["x-request-priority"] == "normal"
    low = httpx.post(url, json=body, headers={"X-Request-Priority": "low"})
    assert low.headers["x-request-priority"] == "low"
    # No keys configured: nobody may ask above normal.
    high = httpx.post(url, json=body, headers={"X-Request-Priority": "high"})
    assert high.status_code == 200 and high.headers["x-request-priority"] == "normal"


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "n", "stop",
                         "stream", "seed", "top_p", "extra", "min_p", "stop_token_ids",
                         "logit_bias", "metadata", "stream_options"]),
        st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.floats(),
                  st.text(max_size=10), st.just(MODEL), st.just(MESSAGES),
                  st.lists(st.integers(-5, 2**40), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.floats(-200, 200), max_size=2),
                  st.dictionaries(st.sampled_from(["12", "-1", "999999"]),
                                  st.one_of(st.floats(), st.integers()), max_size=2)),
        max_size=6,
    ),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)  # fmt: skip
def test_fuzzed_requests_never_get_a_5xx(
    gateway: WorkerProcess, body: dict[str, object], path: str
) -> None:
    body.pop("stream", None)
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 32:  # type: ignore[operator]
        body["max_tokens"] = 32
    resp = httpx.post(gateway.base_url + path, content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert resp.status_code < 500, resp.text


def _dispatch_counts(gw: WorkerProcess) -> dict[str, float]:
    text = httpx.get(gw.base_url + "/metrics").text
    pattern = r'shoal_gateway_dispatch_decisions_total\{instance="([^"]+)"\} ([0-9.e+]+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def test_a_burst_spreads_over_both_instances(gateway: WorkerProcess) -> None:
    before = _dispatch_counts(gateway)

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as ac:
            body = {"model": MODEL, "prompt": "p" * 50, "max_tokens": 400}
            results = await asyncio.gather(*[ac.post("/v1/completions", json=body)
                                             for _ in range(20)])  # fmt: skip
            assert all(r.status_code == 200 for r in results)

    asyncio.run(burst())
    after = _dispatch_counts(gateway)
    sent = {i: after.get(i, 0) - before.get(i, 0) for i in ("sim-0", "sim-1")}
    assert sum(sent.values()) == 20
    assert min(sent.values()) >= 5, sent


def test_disconnect_mid_stream_frees_the_instance(
    gateway: WorkerProcess, cluster: tuple[WorkerProcess, list[WorkerProcess]]
) -> None:
    body = {"model": MODEL, "prompt": "q" * 20, "max_tokens": 900, "stream": True}
    with httpx.stream("POST", gateway.base_url + "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        next(lines), next(lines)

    def idle() -> bool:
        loads = [LoadReport.model_validate_json(httpx.get(w.base_url + "/load").content)
                 for w in cluster[1]]  # fmt: skip
        return all(r.num_running == 0 and r.num_blocks_used == 0 for r in loads)

    wait_for(idle, timeout_s=5)


def test_readyz_models_and_metrics(gateway: WorkerProcess) -> None:
    assert httpx.get(gateway.base_url + "/readyz").json()["instances"] >= 2
    assert _models(gateway) == [MODEL]
    text = httpx.get(gateway.base_url + "/metrics").text
    for name in ["shoal_gateway_requests_total", "shoal_gateway_time_to_first_token_seconds",
                 "shoal_gateway_request_duration_seconds", "shoal_gateway_inflight_requests",
                 "shoal_gateway_retries_total"]:  # fmt: skip
        assert name in text, name


def test_killed_instance_requests_are_retried_elsewhere(
    gateway: WorkerProcess, redis_url: str, tmp_path: Path
) -> None:
    # A third instance that dies; the registry still lists it until its TTL runs out.
    victim = start_worker(engine="sim", redis_url=redis_url, namespace=NAMESPACE,
                          log_dir=tmp_path, instance_id="sim-victim", args=SIM_ARGS,
                          env={"SHOAL_HEARTBEAT_TTL_S": "30"})  # fmt: skip
    try:
        wait_for(lambda: "sim-victim" in httpx.get(gateway.base_url + "/metrics").text
                 or _readyz_instances(gateway) >= 3, timeout_s=10)  # fmt: skip
        victim.kill()
        victim.proc.wait(10)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as ac:
                body = {"model": MODEL, "prompt": "r" * 30, "max_tokens": 20}
                rs = await asyncio.gather(*[ac.post("/v1/completions", json=body)
                                            for _ in range(12)])  # fmt: skip
                return [r.status_code for r in rs]

        assert asyncio.run(burst()) == [200] * 12
        assert _dispatch_counts(gateway).get("sim-victim", 0) >= 1  # it was tried ...
        text = httpx.get(gateway.base_url + "/metrics").text
        assert re.search(r"shoal_gateway_retries_total [1-9]", text)  # ... and retried
    finally:
        victim.stop()


def _readyz_instances(gw: WorkerProcess) -> int:
    return int(httpx.get(gw.base_url + "/readyz").json()["instances"])


def test_two_replicas_spread_a_burst_without_herding(
    gateway: WorkerProcess, redis_url: str, tmp_path: Path
) -> None:
    second = start_gateway(redis_url=redis_url, namespace=NAMESPACE, log_dir=tmp_path,
                           name="gateway-2")  # fmt: skip
    try:
        wait_for(lambda: _readyz_instances(second) >= 2, timeout_s=10)
        before = [_dispatch_counts(g) for g in (gateway, second)]

        async def burst() -> None:
            body = {"model": MODEL, "prompt": "s" * 50, "max_tokens": 400}
            async with (
                httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as a,
                httpx.AsyncClient(base_url=second.base_url, timeout=60) as b,
            ):
                calls = [c.post("/v1/completions", json=body) for c in (a, b) for _ in range(12)]
                assert all(r.status_code == 200 for r in await asyncio.gather(*calls))

        asyncio.run(burst())
        after = [_dispatch_counts(g) for g in (gateway, second)]
        sent = {
            i: sum(a.get(i, 0) - b.get(i, 0) for a, b in zip(after, before, strict=True))
            for i in ("sim-0", "sim-1")
        }
        assert sum(sent.values()) == 24
        assert min(sent.values()) >= 8, sent  # an even split is 12/12; herding gives 24/0
    finally:
        second.stop()


async def _sse_text(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, int, bool]:
    """(text, completion tokens in usage, whether an error event came) of one stream."""
    text, tokens, error = "", 0, False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = True
            elif event["choices"]:
                text += event["choices"][0]["text"]
            else:
                tokens = event["usage"]["completion_tokens"]
    return text, tokens, error


def _replays(gw: WorkerProcess) -> float:
    text = httpx.get(gw.base_url + "/metrics").text
    found = re.search(r"^shoal_gateway_replays_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_streams_of_a_killed_instance_are_replayed_to_the_same_text(
    cluster: tuple[WorkerProcess, list[WorkerProcess]], redis_url: str, tmp_path: Path
) -> None:
    gateway, workers = cluster
    body = {"model": MODEL, "prompt": "replay " * 8, "max_tokens": 600, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    reference = direct(workers[0], {"prompt": body["prompt"], "max_tokens": 600})
    victim = start_worker(engine="sim", redis_url=redis_url, namespace=NAMESPACE,
                          log_dir=tmp_path, instance_id="sim-replayed", args=SIM_ARGS,
                          env={"SHOAL_HEARTBEAT_TTL_S": "30"})  # fmt: skip
    before = _replays(gateway)
    try:
        wait_for(lambda: _readyz_instances(gateway) >= 3, timeout_s=10)

        def victim_streaming() -> bool:
            running = httpx.get(victim.base_url + "/requests").json()
            return any(r["num_output"] >= 8 for r in running)

        async def burst() -> list[tuple[str, int, bool]]:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as ac:
                streams = [asyncio.create_task(_sse_text(ac, body)) for _ in range(9)]
                await asyncio.to_thread(wait_for, victim_streaming, timeout_s=60,
                                        interval_s=0.01)  # fmt: skip
                victim.kill()
                return await asyncio.gather(*streams)

        results = asyncio.run(burst())
    finally:
        victim.stop()
    assert results == [(reference["text"], 600, False)] * 9  # nothing lost, broken or repeated
    assert _replays(gateway) > before


def test_a_refused_resume_is_replayed_not_ended(redis_url: str, tmp_path: Path) -> None:
    """The request migrates while its gateway is stopped. Someone else tries
    to claim it at the destination: refused (not its resume token), it stays
    parked for its owner, until nobody has resumed it for the resume timeout
    and it is aborted; then the gateway's resume is refused (404), and it
    continues the stream elsewhere from the tokens it had sent."""
    namespace = f"refused-{uuid.uuid4().hex[:6]}"
    # Slow instances (12 ms a token): the request surely runs through the migration.
    slow = ["--sim-speedup", "2", "--max-model-len", "1024", "--served-model-name", MODEL]
    workers: list[WorkerProcess] = []
    gateway = None
    try:  # everything started is stopped, whichever start fails
        for i in range(2):
            workers.append(start_worker(engine="sim", redis_url=redis_url, namespace=namespace,
                                        log_dir=tmp_path, instance_id=f"sim-slow-{i}",
                                        args=slow,
                                        env={"SHOAL_RESUME_TIMEOUT_S": "1"}))  # fmt: skip
        gateway = start_gateway(redis_url=redis_url, namespace=namespace, log_dir=tmp_path)
        wait_for(lambda: _readyz_instances(gateway) == 2, timeout_s=10)
        body = {"model": MODEL, "prompt": "refused " * 6, "max_tokens": 900, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        assert _refused_resume_scenario(gateway, workers, body) == (
            direct(workers[0], {"prompt": body["prompt"], "max_tokens": 900})["text"],
            900,
            False,
        )
        assert _replays(gateway) == 1
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()


def _refused_resume_scenario(
    gateway: WorkerProcess, workers: list[WorkerProcess], body: dict[str, Any]
) -> tuple[str, int, bool]:
    def running() -> tuple[WorkerProcess, str] | None:
        for w in workers:
            for r in httpx.get(w.base_url + "/requests").json():
                if r["num_output"] >= 8:
                    return w, str(r["request_id"])
        return None

    async def scenario() -> tuple[str, int, bool]:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as ac:
            stream = asyncio.create_task(_sse_text(ac, body))
            await asyncio.to_thread(wait_for, lambda: running() is not None, timeout_s=60,
                                    interval_s=0.01)  # fmt: skip
            found = running()
            assert found is not None
            source, rid = found
            (dest,) = [w for w in workers if w is not source]
            gateway.proc.send_signal(signal.SIGSTOP)
            try:
                move = {"destination": dest.base_url, "request_ids": [rid], "mode": "recompute"}
                resp = await asyncio.to_thread(httpx.post, source.base_url + "/migrate",
                                               json=move, timeout=60)  # fmt: skip
                assert resp.json()[0]["outcome"] == "migrated", resp.text
                async with httpx.AsyncClient(timeout=30) as thief:  # a member, not the owner
                    stolen = await thief.get(f"{dest.base_url}/resume/{rid}")
                assert stolen.status_code == 404, stolen.text

                def parked() -> list[str]:
                    return list(httpx.get(dest.base_url + "/migrations").json()["parked"])

                assert rid in parked()  # still there for its owner
                await asyncio.to_thread(
                    wait_for, lambda: rid not in parked(), timeout_s=30, interval_s=0.05
                )  # fmt: skip (unclaimed: aborted)
            finally:
                gateway.proc.send_signal(signal.SIGCONT)
            return await stream

    return asyncio.run(scenario())


def test_the_endpoints_clients_probe(gateway: WorkerProcess) -> None:
    """``/health``, ``/version``, ``/tokenize``, ``/detokenize`` as ``vllm serve``
    answers them, through the gateway to an instance of the model."""
    url = gateway.base_url
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.content == b""
    assert httpx.get(url + "/version").json()["version"]
    tok = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "shoal"}).json()
    assert tok == {
        "count": 5,
        "max_model_len": 1024,
        "tokens": list(b"shoal"),
        "token_strs": None,
    }  # fmt: skip (the sim's tokens are bytes)
    chat = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    assert bytes(chat["tokens"]).decode().endswith("<assistant>")
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]})
    assert back.json() == {"prompt": "shoal"}
    for path, body, status, param in [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"model": MODEL, "tokens": [999]}, 400, "tokens"),
        ("/tokenize", {"model": MODEL}, 400, None),
        ("/tokenize", {"model": MODEL, "prompt": "x", "return_token_strs": True}, 400, None),
    ]:
        resp = httpx.post(url + path, json=body)
        assert resp.status_code == status, resp.text
        assert param is None or resp.json()["error"]["param"] == param


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(
    gateway: WorkerProcess,
) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with httpx.stream("POST", gateway.base_url + "/v1/completions", json=body) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    with_text = [e for e in events if e["choices"]]
    counts = [e["usage"]["completion_tokens"] for e in with_text]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert all(e["usage"]["prompt_tokens"] == 3 for e in with_text)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 9


def test_fields_openai_accepts_and_ignores_are_accepted(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        metadata={"team": "a"},
        store=False,
        user="u1",
    )
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_stop_token_ids_end_the_output_after_the_token(
    cluster: tuple[WorkerProcess, list[WorkerProcess]],
) -> None:
    gateway, workers = cluster
    plain = direct(workers[0], {"prompt": "stop here", "max_tokens": 12})
    ids = plain["token_ids"]
    assert isinstance(ids, list)
    stop = ids[3]
    expected = ids[: ids.index(stop) + 1]
    body = {"model": MODEL, "prompt": "stop here", "max_tokens": 12, "stop_token_ids": [stop]}
    out = httpx.post(gateway.base_url + "/v1/completions", json=body, timeout=30).json()
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(expected)
    bads: list[tuple[dict[str, Any], str | None]] = [
        ({"stop_token_ids": [99999]}, "stop_token_ids"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, None),
    ]
    for bad, param in bads:
        resp = httpx.post(gateway.base_url + "/v1/completions",
                          json={"model": MODEL, "prompt": "x", **bad})  # fmt: skip
        assert resp.status_code == 400, resp.text
        assert param is None or resp.json()["error"]["param"] == param


def test_stop_strings_cut_the_text_as_vllm_does(
    cluster: tuple[WorkerProcess, list[WorkerProcess]],
) -> None:
    """The text ends where the first stop string starts (with it, when
    ``include_stop_str_in_output``), and generation ends there."""
    gateway, workers = cluster
    plain = direct(workers[0], {"prompt": "cut here", "max_tokens": 24})
    text = plain["text"]
    assert isinstance(text, str) and len(text) > 12
    stop = text[8:10]
    before = text[: text.find(stop)]
    url = gateway.base_url + "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "prompt": "cut here", "max_tokens": 24, "stop": [stop]}
    out = httpx.post(url, json=body, timeout=30).json()["choices"][0]
    assert (out["text"], out["finish_reason"]) == (before, "stop")
    kept = httpx.post(url, json={**body, "include_stop_str_in_output": True}, timeout=30).json()
    assert kept["choices"][0]["text"] == before + stop
    streamed = "".join(
        c.choices[0].text
        for c in openai.OpenAI(
            base_url=gateway.base_url + "/v1", api_key="unused"
        ).completions.create(
            model=MODEL, prompt="cut here", max_tokens=24, stop=[stop], stream=True
        )
        if c.choices
    )
    assert streamed == before


def test_truncate_prompt_tokens_keeps_the_last_ones(gateway: WorkerProcess) -> None:
    url = gateway.base_url + "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "temperature": 0.0}
    cut = httpx.post(url, json={**body, "prompt": "abcdef", "truncate_prompt_tokens": 3}).json()
    tail = httpx.post(url, json={**body, "prompt": "def"}).json()
    assert cut["usage"]["prompt_tokens"] == 3
    assert cut["choices"][0]["text"] == tail["choices"][0]["text"]
    bad = httpx.post(url, json={**body, "prompt": "x", "truncate_prompt_tokens": 0})
    assert bad.status_code == 400


def test_the_gateway_records_its_traffic_for_the_autoscaler(
    client: openai.OpenAI, redis_url: str
) -> None:
    """Arrivals, tokens and latencies of the calls it served reach
    ``<ns>:traffic``, readable as the autoscaler reads them."""
    from redis.asyncio import Redis

    from infra.keys import KeySchema
    from infra.records import Priority
    from infra.traffic_board import TrafficBoard

    outs = [client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
            for _ in range(3)]  # fmt: skip
    tokens = sum(o.usage.total_tokens for o in outs if o.usage is not None)

    async def read() -> tuple[float, float, int]:
        redis = Redis.from_url(redis_url)
        try:
            board = TrafficBoard(redis, KeySchema(NAMESPACE), window_s=600, rate_window_s=600)
            for _ in range(100):  # the gateway flushes once a second (bounded wait)
                s = await board.summary()
                if s.token_rate * 600 >= tokens:
                    break
                await asyncio.sleep(0.1)
            return s.arrival_rate * 600, s.token_rate * 600, s.of(Priority.NORMAL).num_first_tokens
        finally:
            await redis.aclose()

    arrivals, served, first_tokens = asyncio.run(read())
    assert arrivals >= 3 and served >= tokens and first_tokens >= 3

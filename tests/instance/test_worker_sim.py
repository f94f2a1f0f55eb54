"""The instance worker over real HTTP with the sim engine and a real Valkey:
API shapes, bad input, load reports, disconnects, and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from infra.keys import KeySchema
from infra.records import LoadReport
from infra.store import StateStore
from tests.helpers import CLUSTER, WorkerProcess, start_worker, wait_for

NAMESPACE = f"simtest-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = start_worker(
        engine="sim",
        redis_url=redis_url,
        namespace=NAMESPACE,
        log_dir=tmp_path_factory.mktemp("sim-worker"),
        instance_id="sim-a",
        # 10x faster than the A10 model: a 200-token request takes ~0.5 s.
        args=["--sim-speedup", "10", "--max-model-len", "512", "--num-sim-blocks", "256"],
        env={"SHOAL_MAX_BODY_BYTES": "65536"},
    )
    yield w
    w.stop()


@pytest.fixture
def client(worker: WorkerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.base_url, timeout=30) as c:
        yield c


def load_of(client: httpx.Client) -> LoadReport:
    return LoadReport.model_validate_json(client.get("/load").content)


def test_non_streaming_and_streaming_agree(client: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12}
    whole = client.post("/generate", json=body).json()
    assert whole["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 12 == len(whole["token_ids"])
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 12
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        chunks = [json.loads(line) for line in resp.iter_lines() if line]
    assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]
    assert all("finish_reason" not in c for c in chunks[:-1])


def test_openai_endpoints_match_generate(client: httpx.Client, worker: WorkerProcess) -> None:
    """The worker's own /v1 endpoints (what third-party routers and SDKs use)
    give the same greedy text as /generate, streaming and not."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    sdk = openai.OpenAI(
        base_url=worker.base_url + "/v1",
        api_key="unused",
        max_retries=0,
        default_headers=CLUSTER.headers(),
    )  # an instance: a member calls it
    messages: Any = [{"role": "user", "content": "hello"}]
    expected = client.post("/generate", json={"messages": messages, "max_tokens": 12}).json()
    whole = sdk.chat.completions.create(model=model, messages=messages, max_tokens=12)
    assert whole.choices[0].message.content == expected["text"]
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    stream = sdk.completions.create(model=model, prompt="hello", max_tokens=12, stream=True,
                                    stream_options={"include_usage": True},
                                    extra_headers={"X-Request-Priority": "high"})  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert len("".join(c.choices[0].text for c in chunks if c.choices)) > 0
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="no-such-model", prompt="hello", max_tokens=2)
    bad = client.post("/v1/completions", json={"model": model, "prompt": "x", "n": 17})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "bogus": 1}, 400, "bogus"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "temperature": 1e9}, 400, "temperature"),
        ({"prompt": "x" * 600}, 400, "prompt"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages"),
        ({"prompt": "x" * 100, "max_tokens": 500}, 400, "max_tokens"),
        ({"prompt": [1, 2, 99999]}, 400, "prompt"),
        ({"prompt": [-1]}, 400, "prompt"),
        ({"prompt": ""}, 400, None),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, None),
        ({}, 400, None),
        ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ({"prompt": "x", "priority": "urgent"}, 400, "priority"),
    ],
)
def test_bad_input_gets_openai_format_4xx(
    client: httpx.Client, body: dict[str, object], status: int, param: str | None
) -> None:
    resp = client.post("/generate", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_context_length_error_has_openai_code(client: httpx.Client) -> None:
    err = client.post("/generate", json={"prompt": "x" * 600}).json()["error"]
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


def test_malformed_and_oversized_bodies(client: httpx.Client) -> None:
    resp = client.post(
        "/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    resp = client.post(
        "/generate", content=b"x" * 70_000, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "top_p", "stop",
                         "seed", "n", "priority", "stream", "extra"]),
        st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                  st.text(max_size=20), st.lists(st.integers(-5, 400), max_size=5)),
        max_size=6,
    )
)  # fmt: skip
def test_fuzzed_bodies_never_get_a_5xx(client: httpx.Client, body: dict[str, object]) -> None:
    if body.get("stream") is True:
        body["stream"] = False
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:  # type: ignore[operator]
        body["max_tokens"] = 64
    resp = client.post("/generate", content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert "error" in resp.json()


def test_load_report_tracks_running_requests(client: httpx.Client, worker: WorkerProcess) -> None:
    idle = load_of(client)
    assert idle.num_running == 0 and idle.num_blocks_used == 0
    peak: list[LoadReport] = []

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=worker.base_url, timeout=60) as ac:
            reqs = [ac.post("/generate", json={"prompt": "p" * 40, "max_tokens": 150})
                    for _ in range(3)]  # fmt: skip
            watch = asyncio.ensure_future(_watch(ac, peak))
            results = await asyncio.gather(*reqs)
            watch.cancel()
            assert all(r.status_code == 200 for r in results)

    asyncio.run(burst())
    busiest = max(peak, key=lambda r: r.num_running)
    assert busiest.num_running == 3
    # 40 prompt tokens (3 blocks of 16) and more as tokens are generated.
    assert busiest.num_blocks_used >= 3 * 3
    assert busiest.freeness < 256
    wait_for(lambda: load_of(client).num_blocks_used == 0, timeout_s=10)
    after = load_of(client)
    assert after.num_running == 0 and after.num_finished_total >= idle.num_finished_total + 3


async def _watch(ac: httpx.AsyncClient, out: list[LoadReport]) -> None:
    while True:
        out.append(LoadReport.model_validate_json((await ac.get("/load")).content))
        await asyncio.sleep(0.02)


def test_disconnect_aborts_and_frees_blocks(client: httpx.Client) -> None:
    body = {"prompt": "q" * 30, "max_tokens": 400, "stream": True}
    with client.stream("POST", "/generate", json=body) as resp:
        lines = resp.iter_lines()
        next(lines), next(lines)
        assert load_of(client).num_running == 1
    # The client hung up: the worker must abort and return every block.
    wait_for(lambda: load_of(client).num_running == 0, timeout_s=5)
    assert load_of(client).num_blocks_used == 0
    metrics = client.get("/metrics").text
    assert 'shoal_instance_requests_total{finish_reason="abort",priority="normal"}' in metrics


def test_metrics_exposes_instance_families(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    for name in ["shoal_instance_running_requests", "shoal_instance_waiting_requests",
                 "shoal_instance_kv_usage_ratio", "shoal_instance_preemptions_total",
                 "shoal_instance_generation_tokens_per_second",
                 "shoal_instance_time_to_first_token_seconds_bucket",
                 "shoal_instance_time_per_output_token_seconds_bucket"]:  # fmt: skip
        assert name in text, name


async def test_registry_has_the_worker(redis: Redis, worker: WorkerProcess) -> None:
    view = await StateStore(redis, KeySchema(NAMESPACE)).get_instance(worker.instance_id)
    assert view is not None and view.info.address == worker.base_url
    assert view.info.status.value == "active" and view.load is not None


async def test_sigkilled_worker_leaves_registry_within_ttl(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    victim = start_worker(
        engine="sim", redis_url=redis_url, namespace=NAMESPACE, log_dir=tmp_path,
        instance_id="sim-victim", env={"SHOAL_HEARTBEAT_TTL_S": "1.5"},
    )  # fmt: skip
    store = StateStore(redis, KeySchema(NAMESPACE))
    try:
        assert await store.get_instance("sim-victim") is not None
        victim.kill()
        victim.proc.wait(10)
        for _ in range(100):
            ids = [v.info.instance_id for v in await store.list_instances()]
            if "sim-victim" not in ids:
                break
            await asyncio.sleep(0.1)
        assert "sim-victim" not in ids
    finally:
        victim.stop()


def test_shoal_status_json_lists_the_worker(redis_url: str, worker: WorkerProcess) -> None:
    import os
    import subprocess

    from tests.helpers import REPO, SHOAL

    env = {**os.environ, "SHOAL_REDIS_URL": redis_url, "SHOAL_NAMESPACE": NAMESPACE}
    out = subprocess.run([*SHOAL, "status", "--json"], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    status = json.loads(out)
    assert status["schema_version"] == 1 and status["namespace"] == NAMESPACE
    (entry,) = [i for i in status["instances"] if i["info"]["instance_id"] == "sim-a"]
    assert entry["info"]["address"] == worker.base_url
    assert entry["info"]["kv_capacity_tokens"] == 256 * 16  # --num-sim-blocks x block size
    assert entry["info"]["platform"] == "sim"
    assert entry["load"]["freeness"] in ("Infinity",) or isinstance(
        entry["load"]["freeness"], float
    )
    table = subprocess.run([*SHOAL, "status"], env=env, cwd=REPO, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "sim-a" in table and "FREENESS" in table and "KV TOKENS" in table
    assert "4096" in table


def test_shoal_status_without_redis_fails_clearly(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.helpers import REPO, SHOAL

    env = {k: v for k, v in os.environ.items() if k != "SHOAL_REDIS_URL"}
    env["SHOAL_RUN_DIR"] = str(tmp_path)
    done = subprocess.run([*SHOAL, "status"], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "no Redis" in done.stderr

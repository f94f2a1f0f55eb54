"""The instance worker with real vLLM (CPU build, tiny generated model) and a
real Valkey. The session's one worker engine and one offline reference engine
(conftest.py) start side by side on the two cores."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from infra.keys import KeySchema
from infra.records import LoadReport
from infra.store import StateStore
from tests.helpers import GREEDY_TOKENS, INPUTS, WorkerProcess, wait_for
from tests.helpers import VLLM_NAMESPACE as NAMESPACE

pytestmark = pytest.mark.vllm


@pytest.fixture
def worker(vllm_stack: tuple[WorkerProcess, list[dict[str, list[int]]]]) -> WorkerProcess:
    return vllm_stack[0]


def load_of(worker: WorkerProcess) -> LoadReport:
    return LoadReport.model_validate_json(httpx.get(worker.base_url + "/load").content)


def stream_tokens(
    worker: WorkerProcess, body: dict[str, object]
) -> tuple[list[int], dict[str, Any]]:
    with httpx.stream("POST", worker.base_url + "/generate", json={**body, "stream": True},
                      timeout=120) as resp:  # fmt: skip
        assert resp.status_code == 200, resp.read()
        chunks = [json.loads(line) for line in resp.iter_lines() if line]
    return [t for c in chunks for t in c["token_ids"]], chunks[-1]


def test_greedy_stream_equals_offline_llm_generate(
    vllm_stack: tuple[WorkerProcess, list[dict[str, list[int]]]],
) -> None:
    worker, reference = vllm_stack
    for item, expected in zip(INPUTS, reference, strict=True):
        body: dict[str, object] = {"temperature": 0.0, "max_tokens": GREEDY_TOKENS,
                                   "ignore_eos": True}  # fmt: skip
        if "messages" in item:
            body["messages"] = item["messages"]
        else:
            body["prompt"] = item["prompt_token_ids"]
        tokens, last = stream_tokens(worker, body)
        assert tokens == expected["token_ids"]
        assert last["usage"] == {
            "prompt_tokens": len(expected["prompt_token_ids"]),
            "completion_tokens": GREEDY_TOKENS,
            "total_tokens": len(expected["prompt_token_ids"]) + GREEDY_TOKENS,
        }
        whole = httpx.post(worker.base_url + "/generate", json=body, timeout=120).json()
        assert whole["token_ids"] == expected["token_ids"]


def test_bad_input_is_refused_with_4xx(worker: WorkerProcess) -> None:
    url = worker.base_url + "/generate"
    too_long = httpx.post(url, json={"prompt": "fox " * 20000})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(url, json={"prompt": "x", "max_tokens": -3}).status_code == 400
    assert httpx.post(url, json={"prompt": "x", "best_of": 3}).status_code == 400
    assert httpx.post(url, json={"prompt": "x", "model": "gpt-9"}).status_code == 404


def test_high_priority_overtakes_waiting_normal_requests(worker: WorkerProcess) -> None:
    """Four long requests fill the batch (max_num_seqs = 4); three normal and
    then one high request queue behind them. When a slot frees, the high
    request is the one admitted. (The long requests are not streamed so that
    this test's client stays light on the two shared cores.)"""
    order: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=worker.base_url, timeout=300) as ac:

            async def first_token(name: str, body: dict[str, object]) -> None:
                async with ac.stream("POST", "/generate", json={**body, "stream": True}) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if name not in order and line and json.loads(line)["token_ids"]:
                            order.append(name)

            # Long enough (about a minute) to outlast the set-up below even when a
            # busy two-core machine stalls this client for seconds.
            long = {"prompt": "Large language models", "max_tokens": 16000, "ignore_eos": True}
            fillers = [asyncio.ensure_future(ac.post("/generate", json=long)) for _ in range(4)]
            await _until(worker, "4 running", lambda r: r.num_running == 4)
            short = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}
            normals = [asyncio.ensure_future(first_token(f"normal{i}", short)) for i in range(3)]
            await _until(worker, "3 waiting", lambda r: r.waiting_by_priority.normal == 3)
            high = asyncio.ensure_future(first_token("high", {**short, "priority": "high"}))
            await _until(worker, "high waiting", lambda r: r.waiting_by_priority.high == 1)
            fillers[0].cancel()  # free one slot: the client of long0 goes away
            await high
            for filler in fillers[1:]:
                filler.cancel()
            await asyncio.gather(*normals)
            await asyncio.gather(*fillers, return_exceptions=True)

    asyncio.run(run())
    assert order[0] == "high", order
    assert sorted(order[1:]) == ["normal0", "normal1", "normal2"]
    wait_for(lambda: load_of(worker).num_running == 0, timeout_s=30)


async def _until(
    worker: WorkerProcess, what: str, predicate: Callable[[LoadReport], bool], timeout_s: float = 60
) -> None:
    """Wait (bounded) for a condition on the worker's load report."""
    report = None
    for _ in range(int(timeout_s / 0.02)):
        report = await asyncio.to_thread(load_of, worker)
        if predicate(report):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not reached within {timeout_s}s; last report {report}")


def test_load_report_tracks_the_engine(worker: WorkerProcess) -> None:
    """Six long requests on a batch of four: the report shows four running and
    two waiting with their blocks held; when their clients go away the report
    returns to idle."""
    idle = load_of(worker)
    assert (idle.num_running, idle.num_waiting, idle.num_blocks_used) == (0, 0, 0)

    async def run() -> LoadReport:
        async with httpx.AsyncClient(base_url=worker.base_url, timeout=300) as ac:
            # Distinct prompts: prefix caching would share the blocks of equal ones.
            bodies = [{"prompt": f"{i} fox " * 100, "max_tokens": 8000, "ignore_eos": True}
                      for i in range(6)]  # fmt: skip
            reqs = [asyncio.ensure_future(ac.post("/generate", json=b)) for b in bodies]
            await _until(worker, "4 running, 2 waiting",
                         lambda r: r.num_running == 4 and r.num_waiting == 2)  # fmt: skip
            busy = await asyncio.to_thread(load_of, worker)
            for r in reqs:
                r.cancel()
            await asyncio.gather(*reqs, return_exceptions=True)
            return busy

    busy = asyncio.run(run())
    # Each running request holds its ~100-token prompt (4 blocks of 32) or more.
    assert busy.num_blocks_used >= 4 * 4
    assert busy.num_blocks_used <= busy.num_blocks_total
    assert busy.freeness < busy.num_blocks_total
    assert busy.running_by_priority.normal == 4 and busy.waiting_by_priority.normal == 2
    wait_for(lambda: load_of(worker).num_running == 0, timeout_s=60)
    after = load_of(worker)
    assert (after.num_running, after.num_waiting, after.num_blocks_used) == (0, 0, 0)


def _aborted(worker: WorkerProcess) -> float:
    text = httpx.get(worker.base_url + "/metrics").text
    m = re.search(
        r'shoal_instance_requests_total\{finish_reason="abort",priority="normal"\} (\S+)', text
    )
    return float(m.group(1)) if m else 0.0


def test_disconnect_aborts_and_kv_returns_to_idle(worker: WorkerProcess) -> None:
    """Hang up after the first tokens: the worker aborts the request in the
    engine (counted as an abort, not a finished request) and goes idle. If a
    stall on this busy machine let the whole request finish before the hang-up,
    the attempt proves nothing and is repeated."""
    body = {"prompt": "fox " * 50, "max_tokens": 15000, "ignore_eos": True, "stream": True}
    for _ in range(3):
        before = _aborted(worker)
        with httpx.stream("POST", worker.base_url + "/generate", json=body, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            next(resp.iter_lines())
        wait_for(lambda: load_of(worker).num_running == 0, timeout_s=60)
        if _aborted(worker) == before + 1:
            break
    else:
        raise AssertionError("every attempt finished before its client hung up")
    assert load_of(worker).num_blocks_used == 0
    # The engine itself has let go of the request: a new one runs alone.
    tokens, final = stream_tokens(worker, {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert len(tokens) == 3 and final["finish_reason"] == "length"


async def test_reports_reach_redis(worker: WorkerProcess, redis: Redis) -> None:
    view = await StateStore(redis, KeySchema(NAMESPACE)).get_instance(worker.instance_id)
    assert view is not None and view.info.engine == "vllm" and view.info.block_size == 32
    assert view.load is not None and view.load.num_blocks_total == view.info.num_blocks_total > 0


@pytest.mark.kills_shared_engine
async def test_sigkilled_worker_leaves_registry_within_ttl(
    worker: WorkerProcess, redis: Redis
) -> None:
    # Runs last of the session (see conftest): it kills the shared worker.
    store = StateStore(redis, KeySchema(NAMESPACE))
    assert await store.get_instance(worker.instance_id) is not None
    worker.kill()
    ids: list[str] = [worker.instance_id]
    for _ in range(100):
        ids = [v.info.instance_id for v in await store.list_instances()]
        if worker.instance_id not in ids:
            break
        await asyncio.sleep(0.1)
    assert worker.instance_id not in ids

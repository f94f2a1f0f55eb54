"""Shared fixtures: a real Valkey server for the whole session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from infra import procs
from infra.embedded_redis import EmbeddedRedis
from tests.helpers import (
    CLUSTER,
    GREEDY_TOKENS,
    INPUTS,
    REPO,
    SHOAL,
    VLLM_NAMESPACE,
    WorkerProcess,
    start_worker,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``kills_shared_engine`` run last: they SIGKILL the
    session's vLLM worker, which the other vLLM tests share."""
    items.sort(key=lambda item: item.get_closest_marker("kills_shared_engine") is not None)


os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def cluster_member() -> Iterator[None]:
    """The test process is a member of the test cluster, as the gateway, the
    autoscaler and the instances are: its httpx clients carry the cluster
    credential, so tests may call instances' internal endpoints. (A header
    given explicitly wins: a refusal test sends its own, or none from another
    process: tests/security.)"""
    patch = pytest.MonkeyPatch()
    for cls in (httpx.Client, httpx.AsyncClient):
        patch.setattr(cls, "__init__", _with_credential(cls.__init__))
    yield
    patch.undo()


def _with_credential(init: Any) -> Any:
    def __init__(self: Any, *args: Any, headers: Any = None, **kwargs: Any) -> None:
        merged = httpx.Headers(CLUSTER.headers())
        merged.update(httpx.Headers(headers))
        init(self, *args, headers=merged, **kwargs)

    return __init__


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis.start(tmp_path_factory.mktemp("valkey"))
    yield server
    server.stop()
    assert server.process.poll() is not None, "valkey-server still running"


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    subprocess.run([*SHOAL, "model", "tiny", str(path)], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    return path


@pytest.fixture(scope="session")
def vllm_stack(
    tiny_model: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, list[dict[str, list[int]]]]]:
    tmp = tmp_path_factory.mktemp("vllm")
    inputs, out = tmp / "inputs.json", tmp / "reference.json"
    inputs.write_text(json.dumps(INPUTS))
    with (tmp / "reference.log").open("wb") as err:
        reference = procs.spawn(
            [sys.executable, str(Path(__file__).parent / "instance" / "vllm_reference.py"),
             str(tiny_model), str(inputs), str(out), str(GREEDY_TOKENS)],
            env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "1", "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    worker = None
    try:  # (the reference process is stopped even if the worker fails to start)
        worker = start_worker(
            engine="vllm", redis_url=redis_url, namespace=VLLM_NAMESPACE, log_dir=tmp,
            instance_id="vllm-a",
            args=["--model", str(tiny_model), "--served-model-name", "tiny-llama",
                  "--cpu-threads-bind", "0", "--max-num-seqs", "4", "--block-size", "32",
                  "--kv-cache-bytes", str(256 * 1024 * 1024), "--max-model-len", "16384",
                  "--tool-call-parser", "pythonic", "--enable-auto-tool-choice"],
            env={"SHOAL_DTYPE": "float32", "SHOAL_HEARTBEAT_TTL_S": "2"},
        )  # fmt: skip
        assert reference.wait(600) == 0, (tmp / "reference.log").read_text()[-3000:]
        yield worker, json.loads(out.read_text())
    finally:
        if worker is not None:
            worker.stop()
        procs.stop_all([reference], grace_s=5)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")

"""A cluster with TLS (tests/pki.py's CA): two sim instances that serve
their HTTP and KV ports over TLS only, and a gateway that trusts the CA. A
streamed request is migrated with its KV blocks between them, over TLS, and
ends whole; plain TCP reaches neither surface. (The KV connector's own TLS is
tested in-process: tests/migration/test_transport.py.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.cluster_auth import Purpose
from infra.tls import ClusterTls
from migration.wire import BlocksRead, Endpoint, ReadBlocks, WireError, call
from tests.helpers import CLUSTER, WorkerProcess, start_gateway, start_worker, wait_for
from tests.pki import ThrowawayCa

NAMESPACE = f"tls-{uuid.uuid4().hex[:6]}"
MAX_TOKENS = 400


class Cluster:
    def __init__(self, ca: ThrowawayCa, member: ClusterTls, gateway: WorkerProcess,
                 instances: list[WorkerProcess]) -> None:  # fmt: skip
        self.ca, self.member, self.gateway, self.instances = ca, member, gateway, instances
        self.verify = ca.client().client_context()

    def get(self, url: str) -> Any:
        return httpx.get(url, verify=self.verify, timeout=10).json()


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("tls")
    ca = ThrowawayCa.create(log_dir / "pki")
    member = ca.member("instance")
    started: list[WorkerProcess] = []
    try:
        for name in ("tls-a", "tls-b"):
            started.append(start_worker(
                engine="sim", redis_url=redis_url, namespace=NAMESPACE, log_dir=log_dir,
                instance_id=name, env=member.env(),
                args=["--sim-speedup", "5", "--max-model-len", "2048"],
            ))  # fmt: skip
        gateway = start_gateway(redis_url=redis_url, namespace=NAMESPACE, log_dir=log_dir,
                                env=ca.client().env())  # fmt: skip
        started.append(gateway)
        yield Cluster(ca, member, gateway, started[:2])
    finally:
        for w in started:
            w.stop()


async def _stream(gateway: WorkerProcess, body: dict[str, Any]) -> tuple[int, bool]:
    """(completion tokens in usage, whether an error event came) of one stream."""
    tokens, error = 0, False
    async with (
        httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            error = error or "error" in event
            if not event.get("choices") and "usage" in event:
                tokens = event["usage"]["completion_tokens"]
    return tokens, error


def test_a_stream_through_the_gateway_migrates_with_its_kv_over_tls(cluster: Cluster) -> None:
    a, b = cluster.instances
    for w in (a, b):
        assert cluster.get(w.base_url + "/info")["address"] == w.base_url.rstrip("/")
        assert w.base_url.startswith("https://127.0.0.1:")

    def running() -> tuple[WorkerProcess, str] | None:
        for w in cluster.instances:
            for r in cluster.get(w.base_url + "/requests"):
                if r["num_output"] >= 8:
                    return w, str(r["request_id"])
        return None

    async def scenario() -> tuple[tuple[int, bool], dict[str, Any]]:
        body = {"model": "sim-model", "prompt": "tls " * 64, "max_tokens": MAX_TOKENS,
                "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}  # fmt: skip
        stream = asyncio.create_task(_stream(cluster.gateway, body))
        await asyncio.to_thread(wait_for, lambda: running() is not None, timeout_s=60,
                                interval_s=0.01)  # fmt: skip
        found = running()
        assert found is not None
        source, rid = found
        (dest,) = [w for w in cluster.instances if w is not source]
        move = {"destination": dest.base_url, "request_ids": [rid], "mode": "kv"}
        async with httpx.AsyncClient(verify=cluster.verify, timeout=60) as client:
            resp = await client.post(source.base_url + "/migrate", json=move)
        assert resp.status_code == 200, resp.text
        (record,) = resp.json()
        return await stream, record

    (tokens, error), record = asyncio.run(scenario())
    assert record["outcome"] == "migrated" and record["mode"] == "kv", record
    assert record["blocks"] > 0 and record["bytes"] > 0, record
    assert (tokens, error) == (MAX_TOKENS, False)


def test_plain_tcp_reaches_neither_the_http_nor_the_kv_port(cluster: Cluster) -> None:
    a, _ = cluster.instances
    plain = a.base_url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(plain + "/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(a.base_url + "/health", timeout=10)  # a client that does not trust the CA
    kv = Endpoint.parse(cluster.get(a.base_url + "/migrations/kv")["kv_port"])
    read = ReadBlocks(request_id="any", first=0, count=1)
    auth = CLUSTER.token(Purpose.KV)
    with pytest.raises(WireError) as plain_tcp:
        call(kv, read, BlocksRead, timeout_s=10, auth=auth)
    assert "not granted" not in str(plain_tcp.value)  # refused before any request is read
    with pytest.raises(WireError, match="not granted"):  # read, and refused for its grant
        call(kv, read, BlocksRead, timeout_s=10, auth=auth, tls=cluster.member)

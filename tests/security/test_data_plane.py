"""The data plane behind the gateway is a trust boundary of its own: two sim
instances, and what a process that is not a member of the cluster (no
cluster secret) can do to them, and what a member can do to another member's
request. Tests of the credential itself are in-process
(tests/instance/test_worker_inprocess.py, tests/migration/test_transport.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from infra.cluster_auth import RESUME_TOKEN_HEADER, SECRET_VARIABLES, Purpose
from infra.keys import KeySchema
from infra.records import InstanceInfo, InstanceStatus
from infra.store import StateStore
from migration.wire import BlocksRead, Endpoint, ReadBlocks, WireError, call
from tests.helpers import CLUSTER, REPO, WorkerProcess, free_port, start_worker

NAMESPACE = f"security-{uuid.uuid4().hex[:6]}"
OWNER = "the-owners-resume-token"
MAX_TOKENS = 1500


@pytest.fixture(scope="module")
def pair(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    log_dir = tmp_path_factory.mktemp("security")
    workers: list[WorkerProcess] = []
    try:
        for name in ("sec-a", "sec-b"):
            workers.append(start_worker(
                engine="sim", redis_url=redis_url, namespace=NAMESPACE, log_dir=log_dir,
                instance_id=name, args=["--sim-speedup", "5", "--max-model-len", "2048"],
            ))  # fmt: skip
        yield workers[0], workers[1]
    finally:
        for w in workers:
            w.stop()


class _Stream:
    """A migratable request on an instance, read as its gateway reads it."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.rid = f"sec-{uuid.uuid4().hex[:6]}"
        body = {"prompt": "secret prompt " * 8, "max_tokens": MAX_TOKENS, "stream": True,
                "migratable": True, "request_id": self.rid, "resume_token": OWNER,
                "ignore_eos": True}  # fmt: skip
        self._client = httpx.Client(timeout=120)
        self._resp = self._client.send(
            self._client.build_request("POST", worker.base_url + "/generate", json=body),
            stream=True,
        )
        assert self._resp.status_code == 200, self._resp.read()
        self._lines = self._resp.iter_lines()
        self.tokens = 0

    def read(self, n: int) -> None:
        while self.tokens < n:
            chunk = json.loads(next(line for line in self._lines if line))
            assert chunk.get("error") is None and not chunk.get("migrated_to"), chunk
            self.tokens += len(chunk.get("token_ids", []))

    def finish(self) -> dict[str, Any]:
        last: dict[str, Any] = {}
        for line in self._lines:
            if line:
                last = json.loads(line)
                assert last.get("error") is None, last
                self.tokens += len(last.get("token_ids", []))
        self._resp.close()
        self._client.close()
        return last


def _intruder(worker: WorkerProcess, rid: str) -> dict[str, Any]:
    kv = httpx.get(worker.base_url + "/migrations/kv").json()["kv_port"]
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    out = subprocess.run(
        [sys.executable, "-m", "tests.security.intruder", worker.base_url, kv, rid],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_an_outsider_on_loopback_reads_aborts_drains_and_outranks_nothing(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """Knowing the instance's ports and even a running request's id, a process
    without the cluster secret cannot list requests, read the rest of one
    (HTTP resume or KV blocks), abort it, drain the instance, or get a
    request served at any priority; the request runs to its end for its
    owner and the instance stays active."""
    a, _ = pair
    stream = _Stream(a)
    stream.read(16)
    tried = _intruder(a, stream.rid)
    http = {k: v for k, v in tried.items() if not k.startswith("kv_") and k != "health"}
    assert http == dict.fromkeys(http, 401), tried
    assert "unauthenticated" in tried["kv_read"] and "unauthenticated" in tried["kv_status"]
    assert tried["health"] == 200  # the probes stay open
    last = stream.finish()
    assert last["finish_reason"] == "length" and stream.tokens == MAX_TOKENS
    assert httpx.get(a.base_url + "/info").json()["status"] == "active"
    metrics = httpx.get(a.base_url + "/metrics").text
    assert 'shoal_instance_unauthenticated_calls_total{path="/abort"} 1.0' in metrics
    assert httpx.get(a.base_url + "/migrations/kv").json()["unauthenticated"] >= 2
    assert _metric(metrics, 'shoal_instance_kv_port_refusals_total{reason="unauthenticated"}') >= 2


def _metric(text: str, series: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


def test_a_member_that_does_not_hold_the_migration_reads_no_kv(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """A member of the cluster (it has the credential) that knows a running
    request's engine id reads none of its KV blocks: they go only to the
    destination of a migration of it, with that migration's grant."""
    a, _ = pair
    stream = _Stream(a)
    stream.read(16)
    (running,) = [r for r in httpx.get(a.base_url + "/requests").json()
                  if r["request_id"] == stream.rid]  # fmt: skip
    endpoint = Endpoint.parse(httpx.get(a.base_url + "/migrations/kv").json()["kv_port"])
    auth = CLUSTER.token(Purpose.KV)
    for grant in ("", "a-grant-it-guessed-at-random"):
        read = ReadBlocks(request_id=running["engine_request_id"], first=0, count=1, grant=grant)
        with pytest.raises(WireError, match="not granted"):
            call(endpoint, read, BlocksRead, auth=auth)
    metrics = httpx.get(a.base_url + "/metrics").text
    assert _metric(metrics, 'shoal_instance_kv_port_refusals_total{reason="not_granted"}') >= 2
    assert stream.finish()["finish_reason"] == "length" and stream.tokens == MAX_TOKENS


def test_a_migration_goes_only_to_a_registered_instance(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """``/migrate`` to an address no instance of the model registered is a
    400 and the request goes on where it is."""
    a, _ = pair
    stream = _Stream(a)
    stream.read(16)
    stray = f"http://127.0.0.1:{free_port()}"
    resp = httpx.post(a.base_url + "/migrate", json={"destination": stray,
                      "request_ids": [stream.rid]}, timeout=30)  # fmt: skip
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "destination", resp.text
    assert "registry" in resp.json()["error"]["message"]
    assert stream.finish()["finish_reason"] == "length" and stream.tokens == MAX_TOKENS


class _Rogue(BaseHTTPRequestHandler):
    """A server that registered itself as an instance, without the secret."""

    seen: list[str] = []

    def do_POST(self) -> None:
        _Rogue.seen.append(self.path)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"instance_id": "rogue", "proof": "0" * 64}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_registered_impostor_proves_nothing_and_gets_nothing(
    pair: tuple[WorkerProcess, WorkerProcess], redis_url: str
) -> None:
    """A server that wrote itself into the registry as an active instance of
    the model is asked to prove it holds the cluster secret before anything
    moves: it cannot, the migration is refused, and all it ever received is
    the challenge."""
    a, _ = pair
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Rogue)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    info = InstanceInfo.model_validate({
        **httpx.get(a.base_url + "/info").json(), "instance_id": "rogue", "address": address,
        "status": InstanceStatus.ACTIVE.value,
    })  # fmt: skip

    async def register() -> None:
        redis = Redis.from_url(redis_url)
        await StateStore(redis, KeySchema(NAMESPACE)).publish(info, None, ttl_s=30)
        await redis.aclose()

    asyncio.run(register())
    try:
        stream = _Stream(a)
        stream.read(16)
        resp = httpx.post(a.base_url + "/migrate", json={"destination": address,
                          "request_ids": [stream.rid], "mode": "kv"}, timeout=30)  # fmt: skip
        assert resp.status_code == 400, resp.text
        assert "could not prove" in resp.json()["error"]["message"], resp.text
        assert _Rogue.seen == ["/migration/hello"]
        assert stream.finish()["finish_reason"] == "length" and stream.tokens == MAX_TOKENS
    finally:
        server.shutdown()


def test_only_the_owner_resumes_a_migrated_request(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """A member that is not the request's gateway (no resume token, or a
    wrong one) cannot take a migrated request's output: the request stays
    parked and its owner resumes it with every token."""
    a, b = pair
    stream = _Stream(a)
    stream.read(16)
    move = {"destination": b.base_url, "request_ids": [stream.rid], "mode": "kv"}
    (record,) = httpx.post(a.base_url + "/migrate", json=move, timeout=60).json()
    assert record["outcome"] == "migrated", record
    while True:  # the source's stream ends with the pointer to b
        chunk = json.loads(next(line for line in stream._lines if line))
        stream.tokens += len(chunk.get("token_ids", []))
        if chunk.get("migrated_to"):
            break
    stream._resp.close()
    url = f"{b.base_url}/resume/{stream.rid}"
    for thief in ({}, {RESUME_TOKEN_HEADER: "a-guessed-token-long-enough"}):
        assert httpx.get(url, headers=thief, timeout=10).status_code == 404
    assert stream.rid in httpx.get(b.base_url + "/migrations").json()["parked"]
    rest = 0
    with httpx.stream("GET", url, headers={RESUME_TOKEN_HEADER: OWNER}, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line:
                rest += len(json.loads(line).get("token_ids", []))
    assert stream.tokens + rest == MAX_TOKENS
    refused = httpx.get(b.base_url + "/metrics").text
    assert 'shoal_instance_resumes_refused_total{reason="token"} 2.0' in refused

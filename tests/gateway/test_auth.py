"""API keys, clamped priorities and rate limits enforced across two gateway
replicas through Redis."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth import digest
from tests.helpers import REPO, SHOAL, WorkerProcess, start_gateway, start_worker, wait_for

NAMESPACE = f"authtest-{uuid.uuid4().hex[:6]}"
BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}
KEYS = {
    "keys": [
        {"name": "alice", "key": "sk-alice", "max_priority": "high"},
        {"name": "bob", "key": "sk-bob", "requests_per_min": 3},
        {"name": "carol", "sha256": digest("sk-carol"), "tokens_per_min": 30},
    ]
}


@pytest.fixture(scope="module")
def gateways(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("auth")
    keys_file = logs / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    env = {"SHOAL_KEYS_FILE": str(keys_file)}
    procs: list[WorkerProcess] = []
    try:
        sim_args = ["--served-model-name", "m", "--sim-speedup", "50"]
        procs.append(start_worker(engine="sim", redis_url=redis_url, namespace=NAMESPACE,
                                  log_dir=logs, instance_id="sim-auth", args=sim_args))  # fmt: skip
        for name in ("gw-a", "gw-b"):
            procs.append(start_gateway(redis_url=redis_url, namespace=NAMESPACE, log_dir=logs,
                                       name=name, env=env))  # fmt: skip
        for gw in procs[1:]:
            wait_for(lambda g=gw: httpx.get(g.base_url + "/readyz").json()["instances"] == 1,
                     timeout_s=10)  # fmt: skip
        yield procs[1], procs[2]
    finally:
        for p in procs:
            p.stop()


def post(gw: WorkerProcess, key: str | None, priority: str | None = None) -> httpx.Response:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if priority is not None:
        headers["X-Request-Priority"] = priority
    return httpx.post(gw.base_url + "/v1/completions", json=BODY, headers=headers, timeout=30)


def test_missing_or_wrong_key_is_401(gateways: tuple[WorkerProcess, WorkerProcess]) -> None:
    gw, _ = gateways
    for key in (None, "sk-nobody"):
        resp = post(gw, key)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_priority_is_clamped_to_the_keys_maximum(
    gateways: tuple[WorkerProcess, WorkerProcess],
) -> None:
    gw, _ = gateways
    assert post(gw, "sk-alice", "high").headers["x-request-priority"] == "high"
    assert post(gw, "sk-bob", "high").headers["x-request-priority"] == "normal"
    assert post(gw, "sk-alice", "low").headers["x-request-priority"] == "low"


def in_one_minute(run: Callable[[], list[int]]) -> list[int]:
    """Run ``run`` inside one rate-limit window (limits are per calendar minute)."""
    for _ in range(3):
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        start = int(time.time() // 60)
        result = run()
        if int(time.time() // 60) == start:
            return result
    raise AssertionError("could not stay within one minute")


def test_request_limit_holds_across_replicas(
    gateways: tuple[WorkerProcess, WorkerProcess],
) -> None:
    a, b = gateways
    # bob has 3 requests a minute in all, whichever replica they reach (one may
    # have been spent by the test above).
    statuses = in_one_minute(lambda: [post(gw, "sk-bob").status_code for gw in (a, b, a, b, a)])
    assert statuses[0] == 200 and statuses[-2:] == [429, 429]
    assert statuses.count(200) in (2, 3)
    limited = post(b, "sk-bob")
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 60


def test_token_limit(gateways: tuple[WorkerProcess, WorkerProcess]) -> None:
    a, b = gateways
    used = post(a, "sk-carol").json()["usage"]["total_tokens"]  # 5 prompt + 4 output
    assert used == 9
    statuses = in_one_minute(lambda: [post(gw, "sk-carol").status_code for gw in (b, a) * 4])
    # 30 tokens a minute: at most 4 requests of 9 tokens are admitted, then 429.
    assert 429 in statuses and statuses.count(200) <= 4


def test_keys_added_in_redis_work_on_every_replica(
    gateways: tuple[WorkerProcess, WorkerProcess], redis_url: str
) -> None:
    env = {**os.environ, "SHOAL_REDIS_URL": redis_url, "SHOAL_NAMESPACE": NAMESPACE}
    out = subprocess.run([*SHOAL, "keys", "add", "dave", "--max-priority", "high"], env=env,
                         cwd=REPO, check=True, capture_output=True, text=True)  # fmt: skip
    secret = out.stdout.strip()
    assert secret.startswith("sk-shoal-")
    for gw in gateways:
        wait_for(lambda g=gw: post(g, secret).status_code == 200, timeout_s=10)
        assert post(gw, secret, "high").headers["x-request-priority"] == "high"


def test_keys_file_rejects_entries_with_both_key_and_digest(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from gateway.auth import load_keys_file

    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"keys": [{"name": "x", "key": "k", "sha256": digest("k")}]}))
    with pytest.raises(ValidationError, match="exactly one of 'key' or 'sha256'"):
        load_keys_file(bad)

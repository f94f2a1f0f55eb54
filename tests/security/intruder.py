"""A process on loopback that knows only an instance's ports (and, to make
its job easier, the id of a request running there), but not the cluster
secret: it tries to read, abort, drain and outrank. Prints what each try got,
as JSON, for tests/security/test_data_plane.py.

Usage: python -m tests.security.intruder BASE_URL KV_HOST:PORT REQUEST_ID
"""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from migration.wire import Endpoint, GetStatus, ReadBlocks, Reply, WireError, call


def _http(client: httpx.Client, method: str, url: str, **kw: Any) -> int:
    try:
        return client.request(method, url, timeout=10, **kw).status_code
    except httpx.HTTPError as exc:
        return -1 if "closed" in str(exc) else -2


def _kv(endpoint: Endpoint, request: Any) -> str:
    try:
        call(endpoint, request, Reply, timeout_s=10)
    except WireError as exc:
        return str(exc)
    return "served"


def main(base: str, kv: str, rid: str) -> dict[str, Any]:
    endpoint = Endpoint.parse(kv)
    with httpx.Client() as client:
        high = {"prompt": "x", "max_tokens": 2, "priority": "high"}
        return {
            "requests": _http(client, "GET", f"{base}/requests"),
            "migrations": _http(client, "GET", f"{base}/migrations"),
            "resume": _http(client, "GET", f"{base}/resume/{rid}"),
            "abort": _http(client, "POST", f"{base}/abort/{rid}"),
            "drain": _http(client, "POST", f"{base}/status", json={"status": "draining"}),
            "migrate": _http(
                client,
                "POST",
                f"{base}/migrate",
                json={"destination": "http://127.0.0.1:9", "request_ids": [rid]},
            ),
            "generate_high": _http(client, "POST", f"{base}/generate", json=high),
            "chat_high": _http(
                client,
                "POST",
                f"{base}/v1/completions",
                json={"model": "sim-model", "prompt": "x"},
                headers={"x-request-priority": "high"},
            ),
            "kv_read": _kv(endpoint, ReadBlocks(request_id=rid, first=0, count=1)),
            "kv_status": _kv(endpoint, GetStatus()),
            "health": _http(client, "GET", f"{base}/health"),
        }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))

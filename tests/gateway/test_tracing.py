"""Traces over real OTLP/HTTP: a gateway request's span has dispatch and proxy
children, and the instance's span joins the same trace under the proxy span."""

from __future__ import annotations

import gzip
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.helpers import start_gateway, start_worker, wait_for


class Collector:
    """A minimal OTLP/HTTP trace receiver on loopback."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str, str]] = []  # service, name, trace, id, parent
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            collector.spans.append((attrs.get("service.name", ""), s.name,
                                                    s.trace_id.hex(), s.span_id.hex(),
                                                    s.parent_span_id.hex()))  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def test_instance_span_joins_the_gateway_trace(
    collector: Collector, redis_url: str, tmp_path: Path
) -> None:
    env = {"SHOAL_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    ns = f"trace-{uuid.uuid4().hex[:6]}"
    worker = start_worker(
        engine="sim", redis_url=redis_url, namespace=ns, log_dir=tmp_path,
        instance_id="sim-t", args=["--served-model-name", "m"], env=env,
    )  # fmt: skip
    gateway = None
    try:
        gateway = start_gateway(redis_url=redis_url, namespace=ns, log_dir=tmp_path, env=env)
        wait_for(lambda: httpx.get(gateway.base_url + "/readyz").json()["instances"] == 1,
                 timeout_s=10)  # fmt: skip
        client_trace = uuid.uuid4().hex
        headers = {"traceparent": f"00-{client_trace}-{uuid.uuid4().hex[:16]}-01"}
        body = {"model": "m", "prompt": "hi", "max_tokens": 3}
        resp = httpx.post(gateway.base_url + "/v1/completions", json=body, headers=headers)
        assert resp.status_code == 200

        def names() -> set[str]:
            return {s[1] for s in collector.spans if s[2] == client_trace}

        wait_for(lambda: {"gateway.request", "gateway.dispatch", "gateway.proxy",
                          "instance.generate"} <= names(), timeout_s=15)  # fmt: skip
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()
    spans = {s[1]: s for s in collector.spans if s[2] == client_trace}
    request, dispatch, proxy, instance = (spans[n] for n in (
        "gateway.request", "gateway.dispatch", "gateway.proxy", "instance.generate"))  # fmt: skip
    assert request[0] == "shoal-gateway" and instance[0] == "shoal-instance"
    assert dispatch[4] == request[3] and proxy[4] == request[3]
    assert instance[4] == proxy[3]

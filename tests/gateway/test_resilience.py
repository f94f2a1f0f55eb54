"""The gateway without its dependencies: it never loads an ML framework, and
it rides out a Redis outage."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from infra.embedded_redis import EmbeddedRedis
from tests.helpers import REPO, free_port, start_gateway, start_worker, wait_for


def _metric_values(text: str) -> dict[str, float]:
    """Prometheus text exposition as {sample with labels: value}."""
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    return {name: float(value) for name, value in samples}


def test_gateway_never_imports_torch_vllm_or_transformers() -> None:
    code = (
        "import sys; import gateway.main as m; from infra.settings import GatewaySettings; "
        "m.build_app(GatewaySettings(), 'redis://127.0.0.1:1/0'); "
        "print([x for x in ('torch', 'vllm', 'transformers') if x in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_gateway_serves_through_a_redis_outage_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    redis = EmbeddedRedis.start(tmp_path / "v1", port=port)
    namespace = f"outage-{uuid.uuid4().hex[:6]}"
    worker = gateway = None
    try:
        worker = start_worker(engine="sim", redis_url=redis.url, namespace=namespace,
                              log_dir=tmp_path, instance_id="sim-o",
                              args=["--served-model-name", "m", "--sim-speedup", "20"])  # fmt: skip
        gateway = start_gateway(redis_url=redis.url, namespace=namespace, log_dir=tmp_path)
        url = gateway.base_url
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        wait_for(lambda: httpx.get(url + "/readyz").json()["instances"] == 1, timeout_s=10)

        # A frozen Redis (starved, not down): requests go out without waiting
        # for their reservation, and the skips are counted.
        before = _metric_values(httpx.get(url + "/metrics").text)
        redis.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
            # Three reservations of at least the 0.1 s timeout each went by
            # since the last refresh could have succeeded.
            frozen = _metric_values(httpx.get(url + "/metrics").text)
            assert frozen["shoal_gateway_view_age_seconds"] >= 0.3
        finally:
            redis.process.send_signal(signal.SIGCONT)
        metrics = httpx.get(url + "/metrics").text
        assert "shoal_gateway_reservations_skipped_total 3.0" in metrics
        after = _metric_values(metrics)

        def reserve_delta(sample: str, labels: str = "") -> float:
            key = f'shoal_gateway_redis_call_seconds_{sample}{{call="reserve"{labels}}}'
            return after[key] - before.get(key, 0.0)

        calls, fast = reserve_delta("count"), reserve_delta("bucket", ',le="0.05"')
        assert calls == 3 and fast == 0  # each waited out the timeout

        redis.stop()
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 503, timeout_s=10)
        # Not ready, but still serving from its last view of the cluster.
        for _ in range(3):
            assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200

        redis = EmbeddedRedis.start(tmp_path / "v2", port=port)
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, timeout_s=15)
        wait_for(lambda: httpx.get(url + "/readyz").json()["instances"] == 1, timeout_s=15)
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        for p in (gateway, worker):
            if p is not None:
                p.stop()
        redis.stop()

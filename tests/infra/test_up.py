"""``shoal up`` on sim engines: the whole stack (embedded Redis, instances,
gateway, autoscaler) answers, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import psutil

from tests.helpers import REPO, SHOAL, free_port, wait_for


def test_up_serves_and_stops_everything(tmp_path: Path) -> None:
    port, base = free_port(), free_port()
    env = {**os.environ, "SHOAL_RUN_DIR": str(tmp_path / "run"), "SHOAL_NAMESPACE": "up-test"}
    env.pop("SHOAL_REDIS_URL", None)
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([*SHOAL, "up", "--engine", "sim", "--instances", "2", "--port",
                           str(port), "--base-port", str(base)], cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, process_group=0)  # fmt: skip
    try:
        wait_for(lambda: b"Shoal is up" in (tmp_path / "up.log").read_bytes(), timeout_s=120)
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 4}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        status = subprocess.run([*SHOAL, "status"], cwd=REPO, env=env, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        assert status.count("sim-model") == 2 and "autoscaler: " in status, status
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # redis, 2 instances, gateway, autoscaler
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
        log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                             for c in children), timeout_s=30)  # fmt: skip

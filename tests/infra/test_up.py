"""``shoal up`` on sim engines: the whole stack (embedded Redis, instances,
gateway, autoscaler) answers, and every process it started stops with it:
on Ctrl-C once up or while it is still starting, and when it is SIGKILLed
(their parent-death signal, ``infra.procs``, which the autoscaler's local
provider uses too). A taken port is named before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from infra import procs
from tests.helpers import REPO, SHOAL, free_port, start_autoscaler, wait_for


def _start_up(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    """``shoal up`` with two sim instances: the process, its output and the
    gateway's port."""
    port, base = free_port(), free_port()
    full_env = {**os.environ, "SHOAL_RUN_DIR": str(tmp_path / "run"),
                "SHOAL_NAMESPACE": "up-test", **env}  # fmt: skip
    full_env.pop("SHOAL_REDIS_URL", None)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen([*SHOAL, "up", "--engine", "sim", "--instances", "2", "--port",
                               str(port), "--base-port", str(base)], cwd=REPO, env=full_env,
                              stdout=out, stderr=subprocess.STDOUT, process_group=0)  # fmt: skip
    return up, log, port


def _ensure_stopped(up: subprocess.Popen[bytes]) -> None:
    """After a failed test: stop ``shoal up`` (its children follow it)."""
    if up.poll() is None:
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _started_for(run_dir: Path) -> list[psutil.Process]:
    """Live processes whose environment names ``run_dir``: whatever this
    stack started at any depth, even reparented once its parent died."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("SHOAL_RUN_DIR") == str(run_dir):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return _alive(found)


def test_up_serves_and_stops_everything(tmp_path: Path) -> None:
    up, log, port = _start_up(tmp_path)
    try:
        wait_for(lambda: b"Shoal is up" in log.read_bytes(), timeout_s=300)
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 4}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        env = {**os.environ, "SHOAL_RUN_DIR": str(tmp_path / "run"), "SHOAL_NAMESPACE": "up-test"}
        env.pop("SHOAL_REDIS_URL", None)
        status = subprocess.run([*SHOAL, "status"], cwd=REPO, env=env, capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        assert status.count("sim-model") == 2 and "autoscaler: " in status, status
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # redis, 2 instances, gateway, autoscaler
        up.send_signal(signal.SIGINT)
        up.wait(120)
    finally:
        _ensure_stopped(up)
    assert up.returncode == 0, log.read_text()
    wait_for(lambda: not _alive(children), timeout_s=60)


def test_ctrl_c_while_starting_stops_everything(tmp_path: Path) -> None:
    # The instances' engines would take an hour to start: `shoal up` is surely
    # still waiting for them when the signal comes.
    up, log, _ = _start_up(tmp_path, SHOAL_SIM_STARTUP_S="3600")
    try:
        wait_for(lambda: b"starting 2 sim instance(s)" in log.read_bytes(), timeout_s=120)
        started = psutil.Process(up.pid).children(recursive=True)
        assert len(started) >= 4  # redis, 2 instances, gateway
        up.send_signal(signal.SIGINT)
        up.wait(120)
    finally:
        _ensure_stopped(up)
    out = log.read_text()
    assert up.returncode == 128 + signal.SIGINT, out
    assert "SIGINT during start-up" in out and "Shoal is up" not in out, out
    wait_for(lambda: not _alive(started), timeout_s=60)
    # (and anything started while it stopped: the autoscaler may replace an instance)
    wait_for(lambda: _started_for(tmp_path / "run") == [], timeout_s=60)


def test_sigkilled_up_leaves_no_process_behind(tmp_path: Path) -> None:
    up, log, _ = _start_up(tmp_path)
    try:
        wait_for(lambda: b"Shoal is up" in log.read_bytes(), timeout_s=300)
        started = psutil.Process(up.pid).children(recursive=True)
        assert len(started) >= 5, started  # redis, 2 instances, gateway, autoscaler
        assert len(_started_for(tmp_path / "run")) == len(started)  # what the last check sees
        for child in psutil.Process(up.pid).children():  # own group, same session
            assert os.getpgid(child.pid) == child.pid and os.getsid(child.pid) == os.getsid(up.pid)
        up.kill()  # no cleanup in `shoal up`: the children stop themselves
        up.wait(60)
    finally:
        _ensure_stopped(up)
    wait_for(lambda: not _alive(started), timeout_s=90)
    # (and anything started while it stopped: the autoscaler may replace an instance)
    wait_for(lambda: _started_for(tmp_path / "run") == [], timeout_s=60)


@pytest.mark.parametrize("taken_by", ["gateway", "instance"])
def test_a_taken_port_is_named_before_anything_starts(tmp_path: Path, taken_by: str) -> None:
    port, base = free_port(), free_port()
    taken = port if taken_by == "gateway" else base
    run_dir = tmp_path / "run"
    env = {**os.environ, "SHOAL_RUN_DIR": str(run_dir), "SHOAL_NAMESPACE": "up-test"}
    env.pop("SHOAL_REDIS_URL", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        out = subprocess.run([*SHOAL, "up", "--engine", "sim", "--port", str(port),
                              "--base-port", str(base)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert f"port {taken} (" in out.stderr and "is already in use" in out.stderr, out.stderr
    assert "another `shoal up`?" in out.stderr, out.stderr
    assert not run_dir.exists()  # not even the embedded Redis started
    assert _started_for(run_dir) == []


def test_local_provider_workers_die_with_a_sigkilled_autoscaler(
    redis_url: str, tmp_path: Path
) -> None:
    scaler = start_autoscaler(
        redis_url=redis_url, namespace=f"up-{uuid.uuid4().hex[:6]}", log_dir=tmp_path,
        args=["--engine", "sim", "--min-instances", "1", "--max-instances", "1"],
    )  # fmt: skip

    def workers() -> list[psutil.Process]:
        # Once the worker runs `shoal instance` (exec'd by the wrapper, its
        # parent-death signal set).
        try:
            return [c for c in psutil.Process(scaler.proc.pid).children()
                    if "procs.py" not in " ".join(c.cmdline())]  # fmt: skip
        except psutil.Error:
            return []

    try:
        wait_for(lambda: workers(), timeout_s=120)
        started = workers()
        scaler.kill()  # SIGKILL: no provider.close()
        wait_for(lambda: not _alive(started), timeout_s=90)
    finally:
        scaler.stop()


_PARENT = """
import sys
from infra.procs import spawn
print(spawn(["sleep", "600"]).pid, flush=True)
sys.stdin.read()
"""


def test_a_spawned_child_dies_with_its_sigkilled_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        wait_for(lambda: child.cmdline()[:1] == ["sleep"], timeout_s=60)  # exec'd
        assert child.ppid() == parent.pid
        assert os.getpgid(child.pid) == child.pid and os.getsid(child.pid) == os.getsid(parent.pid)
        parent.kill()
        parent.wait(60)
        wait_for(lambda: not _alive([child]), timeout_s=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_wrapper_does_not_run_the_command_when_its_parent_is_already_gone(
    tmp_path: Path,
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    marker = tmp_path / "ran"
    wrapper = [sys.executable, "-I", "-S", procs.__file__, str(gone.pid),
               str(int(signal.SIGTERM)), "--", "touch", str(marker)]  # fmt: skip
    assert subprocess.run(wrapper, timeout=60).returncode == 128 + signal.SIGTERM
    assert not marker.exists()


def test_spawn_refuses_other_threads_and_missing_programs() -> None:
    errors: list[BaseException] = []

    def off_main() -> None:
        try:
            procs.spawn(["true"])
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join(60)
    assert len(errors) == 1 and "main thread" in str(errors[0])
    with pytest.raises(FileNotFoundError):
        procs.spawn(["no-such-program-shoal"])

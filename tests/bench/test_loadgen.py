"""The load generator: its measurements from recorded results, then end to
end through ``shoal bench run`` against a real Shoal stack (a gateway over
two sim instances, the session's Valkey). No assertion on timing values."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import (
    RequestResult,
    TimelineSample,
    _on_event,
    render_progress,
    render_summary,
    summarize,
)
from bench.traces import Poisson, PriorityMix, TraceConfig, generate_trace, save_trace, uniform
from tests.helpers import REPO, SHOAL, WorkerProcess, free_port, start_gateway, start_worker

NAMESPACE = f"benchtest-{uuid.uuid4().hex[:6]}"
MODEL = "sim-model"
SIM_ARGS = [
    "--sim-speedup",
    "10",
    "--max-model-len",
    "1024",
    "--num-sim-blocks",
    "512",
    "--served-model-name",
    MODEL,
]


# -- measurements, no server -------------------------------------------------
def _result(i: int, priority: str = "normal", **kw: Any) -> RequestResult:
    base: dict[str, Any] = dict(ttft_s=0.1, e2e_s=1.1, output_tokens=11, status=200)
    return RequestResult(i, priority, 5, 11, 0.0, **{**base, **kw})


def test_tpot_is_decode_time_per_token_after_the_first() -> None:
    assert _result(0).tpot_s == pytest.approx(0.1)
    assert _result(0, output_tokens=1).tpot_s is None
    assert _result(0, error="HTTP 503: busy").ok is False


def test_stream_events_fill_the_result() -> None:
    r = RequestResult(0, "normal", 5, 3, 0.0)
    _on_event({"choices": [{"text": "", "finish_reason": None}]}, 0.2, r)
    _on_event({"choices": [{"text": "ab", "finish_reason": "length"}]}, 0.3, r)
    _on_event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, 0.4, r)
    assert (r.ttft_s, r.output_tokens, r.prompt_tokens_reported) == (0.2, 3, 5)
    assert (r.finish_reason, r.num_chunks, r.error) == ("length", 2, None)
    _on_event({"error": {"message": "the instance failed mid-stream"}}, 0.5, r)
    assert r.error == "the instance failed mid-stream"


def test_summary_overall_and_per_priority() -> None:
    results = [_result(0, "high"), _result(1), _result(2), _result(3, error="HTTP 404: nope")]
    timeline = [TimelineSample(0.0, 1, 0, 2, 2), TimelineSample(0.5, 3, 1, 3, 2)]
    s = summarize(results, 2.0, timeline)
    assert (s["num_requests"], s["num_ok"], s["num_errors"]) == (4, 3, 1)
    assert s["requests_per_s"] == 1.5 and s["output_tokens_per_s"] == 33 / 2
    assert s["ttft_s"]["p50"] == pytest.approx(0.1) and s["tpot_s"]["mean"] == pytest.approx(0.1)
    assert set(s["by_priority"]) == {"high", "normal"}
    assert s["by_priority"]["normal"]["num_errors"] == 1
    assert s["errors"] == {"HTTP 404: nope": 1}
    assert s["instances"] == {"mean": 2.5, "min": 2, "max": 3}
    table = render_summary(s)
    assert "TTFT" in table and "high" in table and "error x1: HTTP 404: nope" in table


def test_progress_line_rewrites_itself() -> None:
    out = io.StringIO()
    render_progress(20, 12, 9, 1, 3.25, out, width=10)
    assert out.getvalue() == "\r[====>     ] 9/20 done  3 in flight  1 errors     3.2 s"


# -- end to end --------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    logs = tmp_path_factory.mktemp("bench")
    procs: list[WorkerProcess] = []
    try:
        for name in ("sim-0", "sim-1"):
            procs.append(
                start_worker(
                    engine="sim",
                    redis_url=redis_url,
                    namespace=NAMESPACE,
                    log_dir=logs,
                    instance_id=name,
                    args=SIM_ARGS,
                )
            )
        procs.append(
            start_gateway(
                redis_url=redis_url,
                namespace=NAMESPACE,
                log_dir=logs,
                env={"SHOAL_DEFAULT_MAX_PRIORITY": "high"},
            )
        )
        yield procs[-1]
    finally:
        for p in procs:
            p.stop()


def _trace(path: Path, n: int, seed: int = 0) -> Path:
    config = TraceConfig(
        n, Poisson(10.0), uniform(8, 64), uniform(4, 32), PriorityMix(high=0.2, low=0.1), seed=seed
    )
    save_trace(generate_trace(config), path)
    return path


def _bench_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHOAL, "bench", "run", "--no-progress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replays_a_trace_through_shoal(
    gateway: WorkerProcess, redis_url: str, tmp_path: Path
) -> None:
    trace, out = _trace(tmp_path / "trace.jsonl", 20), tmp_path / "out"
    done = _bench_run(
        "--endpoint",
        gateway.base_url,
        "--trace",
        str(trace),
        "--out",
        str(out),
        "--time-scale",
        "0.5",
        "--status-redis",
        redis_url,
        "--namespace",
        NAMESPACE,
        "--sample-interval",
        "0.1",
    )
    assert done.returncode == 0, done.stderr
    assert "TTFT" in done.stdout and "20 ok, 0 errors" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == MODEL and results["trace_header"]["seed"] == 0
    for r in results["requests"]:
        assert r["ok"] and r["status"] == 200, r
        assert r["output_tokens"] == r["output_tokens_requested"]
        assert r["prompt_tokens_reported"] == r["prompt_tokens"]
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert r["effective_priority"] == r["priority"]
    summary = results["summary"]
    assert (summary["num_ok"], summary["num_errors"], summary["num_short"]) == (20, 0, 0)
    ok_by_priority = {p: g["num_ok"] for p, g in summary["by_priority"].items()}
    assert ok_by_priority == {"high": 4, "normal": 14, "low": 2}
    for group in [summary, *summary["by_priority"].values()]:
        assert set(group["e2e_s"]) == {"mean", "p50", "p90", "p99"}
    assert summary["instances"]["max"] == 2
    assert (out / "latency_cdf.png").stat().st_size > 0
    assert (out / "timeline.png").stat().st_size > 0


def test_text_prompts_are_one_token_per_character(gateway: WorkerProcess, tmp_path: Path) -> None:
    trace, out = _trace(tmp_path / "trace.jsonl", 5, seed=1), tmp_path / "out"
    done = _bench_run(
        "--endpoint",
        gateway.base_url + "/v1",
        "--trace",
        str(trace),
        "--out",
        str(out),
        "--time-scale",
        "0.2",
        "--prompt-mode",
        "text",
        "--model",
        MODEL,
    )
    assert done.returncode == 0, done.stderr
    requests = json.loads((out / "results.json").read_text())["requests"]
    assert [r["prompt_tokens_reported"] for r in requests] == [r["prompt_tokens"] for r in requests]
    assert all(r["ok"] for r in requests)


def test_failed_requests_are_counted_not_fatal(gateway: WorkerProcess, tmp_path: Path) -> None:
    trace, out = _trace(tmp_path / "trace.jsonl", 3), tmp_path / "out"
    done = _bench_run(
        "--endpoint",
        gateway.base_url,
        "--trace",
        str(trace),
        "--out",
        str(out),
        "--model",
        "no-such-model",
        "--time-scale",
        "0",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert (summary["num_ok"], summary["num_errors"]) == (0, 3)
    assert all(e.startswith("HTTP 404") for e in summary["errors"])
    assert summary["e2e_s"] is None


def test_unreachable_endpoint_is_a_user_error(tmp_path: Path) -> None:
    trace = _trace(tmp_path / "trace.jsonl", 2)
    done = _bench_run("--endpoint", f"http://127.0.0.1:{free_port()}", "--trace", str(trace))
    assert done.returncode == 1 and "cannot list models" in done.stderr

"""Load generator: replay a trace against any OpenAI-compatible server
(Shoal's gateway, an instance, ``vllm serve``, another router) and measure
every request.

Each request goes to ``POST /v1/completions`` at its trace arrival time (times
``time_scale``), streaming, with ``max_tokens`` = its output length,
``ignore_eos`` so the output has that length, ``stream_options.include_usage``
to count tokens, and its priority in ``X-Request-Priority``. Prompts have the
trace's token count: as token ids (exact on any server that accepts token-id
prompts, the default) or as text of one character per token (exact for Shoal's
sim engine, whose tokenizer is bytes).

Per request: TTFT (first streamed chunk carrying a choice), TPOT
((e2e - TTFT) / (output tokens - 1)), end-to-end latency, output tokens from
the final usage record, errors (HTTP status, error events, a stream cut
short). Summaries: mean / p50 / p90 / p99 overall and per priority,
throughput. Optionally the instance count over time, read from Shoal's Redis.

    .venv/bin/shoal bench run --endpoint http://127.0.0.1:8000 --trace trace.jsonl --out DIR
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import random
import statistics
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench.traces import Trace, TraceRequest, percentile
from bench.traces.trace import arrival_order
from infra.keys import KeySchema
from infra.records import InstanceStatus, Priority
from infra.store import StateStore

log = logging.getLogger(__name__)

PromptMode = Literal["text", "token-ids"]
PROMPT_MODES: tuple[PromptMode, ...] = ("token-ids", "text")
PRIORITY_HEADER = "X-Request-Priority"


class LoadGenError(Exception):
    """The run could not start (no model to ask for, unreadable endpoint)."""


@dataclass(frozen=True)
class LoadGenConfig:
    """How to replay a trace."""

    endpoint: str
    """Base URL of the server, with or without ``/v1``."""
    model: str | None = None
    """Model to ask for; None takes the first of ``GET /v1/models``."""
    api_key: str | None = None
    prompt_mode: PromptMode = "token-ids"
    token_id_range: tuple[int, int] = (10, 256)
    """Prompt token ids are drawn from ``[lo, hi)`` (valid in any vocabulary
    of at least ``hi`` entries; Shoal's sim engine has 256)."""
    time_scale: float = 1.0
    """Arrival times are multiplied by this: 0.1 replays 100 s of trace in 10 s."""
    request_timeout_s: float = 600.0
    """Longest wait for the next byte of a response."""
    status_redis: str | None = None
    """Shoal's Redis URL, to record the instance count over time."""
    namespace: str = "shoal"
    sample_interval_s: float = 0.5
    progress: bool = True
    """An in-place progress line on stderr (when it is a terminal)."""
    seed: int = 0
    """Seed of the prompt contents."""

    @property
    def api_base(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


@dataclass
class RequestResult:
    """What happened to one trace request."""

    index: int
    priority: str
    prompt_tokens: int
    output_tokens_requested: int
    scheduled_s: float
    """When the trace (scaled) said to send it, from the start of the run."""
    sent_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int | None = None
    """Completion tokens from the final usage record."""
    prompt_tokens_reported: int | None = None
    num_chunks: int = 0
    finish_reason: str | None = None
    status: int | None = None
    effective_priority: str | None = None
    """The priority the server applied (Shoal answers it in the same header)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_s is None or self.e2e_s is None or (self.output_tokens or 0) < 2:
            return None
        assert self.output_tokens is not None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "tpot_s": self.tpot_s}


@dataclass(frozen=True)
class TimelineSample:
    t_s: float
    in_flight: int
    completed: int
    num_instances: int | None = None
    """Instances in Shoal's registry (any status)."""
    num_active: int | None = None


@dataclass
class _Live:
    """Counters the monitors read while the run goes on."""

    total: int
    sent: int = 0
    completed: int = 0
    errors: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed


class PromptFactory:
    """Prompts of exact token counts: slices of one seeded random pool,
    starting at the request's index, so no two share a prefix (no prefix-cache
    hits between requests)."""

    def __init__(
        self,
        mode: PromptMode,
        max_tokens: int,
        num_requests: int,
        seed: int,
        token_id_range: tuple[int, int],
    ) -> None:
        rng = random.Random(f"shoal-bench-prompts:{seed}")
        size = max_tokens + num_requests
        self.mode = mode
        self._text = "".join(rng.choices(string.ascii_lowercase, k=size)) if mode == "text" else ""
        lo, hi = token_id_range
        self._ids = rng.choices(range(lo, hi), k=size) if mode == "token-ids" else []

    def build(self, index: int, num_tokens: int) -> str | list[int]:
        if self.mode == "text":
            return self._text[index : index + num_tokens]
        return self._ids[index : index + num_tokens]


@dataclass
class RunResult:
    config: LoadGenConfig
    model: str
    trace_header: dict[str, Any] | None
    requests: list[RequestResult]
    timeline: list[TimelineSample] = field(default_factory=list)
    started_at: float = 0.0
    """Unix time of the start."""
    duration_s: float = 0.0
    """Start to the end of the last response."""

    def summary(self) -> dict[str, Any]:
        return summarize(self.requests, self.duration_s, self.timeline)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": {**asdict(self.config), "api_key": "***" if self.config.api_key else None},
            "model": self.model,
            "trace_header": self.trace_header,
            "started_at": self.started_at,
            "summary": self.summary(),
            "requests": [r.to_json() for r in self.requests],
            "timeline": [asdict(s) for s in self.timeline],
        }


# -- one request ---------------------------------------------------------------
def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


def _on_event(event: dict[str, Any], elapsed_s: float, result: RequestResult) -> None:
    if "error" in event:
        err = event["error"]
        result.error = str(err.get("message", err) if isinstance(err, dict) else err)
        return
    usage = event.get("usage")
    if isinstance(usage, dict):
        result.output_tokens = usage.get("completion_tokens")
        result.prompt_tokens_reported = usage.get("prompt_tokens")
    for choice in event.get("choices") or []:
        result.num_chunks += 1
        if result.ttft_s is None:
            result.ttft_s = elapsed_s
        result.finish_reason = choice.get("finish_reason") or result.finish_reason


async def _read_stream(resp: aiohttp.ClientResponse, t_sent: float, result: RequestResult) -> None:
    done = False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError(f"unexpected stream event {data[:100]!r}")
        _on_event(event, time.perf_counter() - t_sent, result)
    result.e2e_s = time.perf_counter() - t_sent
    if result.error is None and not done:
        result.error = "the stream ended without [DONE]"
    elif result.error is None and result.output_tokens is None:
        result.error = "no usage record (does the server honour stream_options.include_usage?)"


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    t0: float,
    result: RequestResult,
) -> None:
    t_sent = time.perf_counter()
    result.sent_s = t_sent - t0
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            result.status = resp.status
            result.effective_priority = resp.headers.get(PRIORITY_HEADER)
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {_error_text(await resp.read())}"
                return
            await _read_stream(resp, t_sent, result)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"


# -- the run -------------------------------------------------------------------
async def discover_model(session: aiohttp.ClientSession, config: LoadGenConfig) -> str:
    """The first model the server lists."""
    try:
        async with session.get(config.api_base + "/models", headers=_auth(config)) as resp:
            data = await resp.json(content_type=None)
            return str(data["data"][0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise LoadGenError(
            f"cannot list models at {config.api_base}/models ({exc}); pass --model"
        ) from None


def _auth(config: LoadGenConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def _replay(
    session: aiohttp.ClientSession,
    config: LoadGenConfig,
    model: str,
    trace: Sequence[TraceRequest],
    results: list[RequestResult],
    live: _Live,
    t0: float,
) -> None:
    prompts = PromptFactory(
        config.prompt_mode,
        max(r.prompt_tokens for r in trace),
        len(trace),
        config.seed,
        config.token_id_range,
    )
    url = config.api_base + "/completions"

    async def one(i: int) -> None:
        req = trace[i]
        body = {
            "model": model,
            "prompt": prompts.build(i, req.prompt_tokens),
            "max_tokens": req.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        headers = {**_auth(config), PRIORITY_HEADER: req.priority.value}
        live.sent += 1
        try:
            await _send(session, url, body, headers, t0, results[i])
        finally:
            live.completed += 1
            live.errors += not results[i].ok

    tasks: list[asyncio.Task[None]] = []
    for i in arrival_order(trace):
        delay = t0 + results[i].scheduled_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def _instance_counts(config: LoadGenConfig, redis: Redis) -> tuple[int | None, int | None]:
    try:
        views = await StateStore(redis, KeySchema(config.namespace)).list_instances()
    except (RedisError, OSError) as exc:
        log.warning("instance count unavailable: %s", exc)
        return None, None
    return len(views), sum(v.info.status == InstanceStatus.ACTIVE for v in views)


async def _take_sample(
    config: LoadGenConfig, live: _Live, t0: float, redis: Redis | None
) -> TimelineSample:
    counts = await _instance_counts(config, redis) if redis is not None else (None, None)
    return TimelineSample(time.perf_counter() - t0, live.in_flight, live.completed, *counts)


async def _sample(
    config: LoadGenConfig, live: _Live, t0: float, redis: Redis | None, out: list[TimelineSample]
) -> None:
    """Record in-flight requests (and instances) every ``sample_interval_s``."""
    while True:
        out.append(await _take_sample(config, live, t0, redis))
        await asyncio.sleep(config.sample_interval_s)


async def _progress(live: _Live, t0: float, stream: TextIO) -> None:
    try:
        while True:
            render_progress(
                live.total, live.sent, live.completed, live.errors, time.perf_counter() - t0, stream
            )
            await asyncio.sleep(0.25)
    finally:
        render_progress(
            live.total, live.sent, live.completed, live.errors, time.perf_counter() - t0, stream
        )
        stream.write("\n")


def render_progress(
    total: int, sent: int, done: int, errors: int, elapsed_s: float, stream: TextIO, width: int = 30
) -> None:
    """One in-place progress line: ``[=====>    ] 12/20 done  3 in flight ...``."""
    filled = width * done // max(1, total)
    bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
    stream.write(
        f"\r[{bar}] {done}/{total} done  {sent - done} in flight  "
        f"{errors} errors  {elapsed_s:6.1f} s"
    )
    stream.flush()


async def _measure(
    session: aiohttp.ClientSession,
    redis: Redis | None,
    trace: Trace,
    config: LoadGenConfig,
    model: str,
) -> RunResult:
    results = [
        RequestResult(
            i, r.priority.value, r.prompt_tokens, r.output_tokens, r.arrival_s * config.time_scale
        )
        for i, r in enumerate(trace.requests)
    ]
    header = None if trace.header is None else asdict(trace.header)
    run = RunResult(config, model, header, results, started_at=time.time())
    live, t0 = _Live(len(results)), time.perf_counter()
    monitors = [asyncio.create_task(_sample(config, live, t0, redis, run.timeline))]
    if config.progress and sys.stderr.isatty():
        monitors.append(asyncio.create_task(_progress(live, t0, sys.stderr)))
    try:
        await _replay(session, config, model, trace.requests, results, live, t0)
    finally:
        run.duration_s = time.perf_counter() - t0
        for task in monitors:
            task.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
    run.timeline.append(await _take_sample(config, live, t0, redis))
    return run


async def run_trace(trace: Trace, config: LoadGenConfig) -> RunResult:
    """Replay ``trace`` and measure every request."""
    if not config.time_scale >= 0:
        raise LoadGenError(f"time_scale must be >= 0 (got {config.time_scale})")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=config.request_timeout_s)
    redis = Redis.from_url(config.status_redis) if config.status_redis else None
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            model = config.model or await discover_model(session, config)
            return await _measure(session, redis, trace, config, model)
    finally:
        if redis is not None:
            await redis.aclose()


# -- summaries -----------------------------------------------------------------
def latency_stats(values: Sequence[float]) -> dict[str, float] | None:
    """mean / p50 / p90 / p99 of some latencies (seconds); None for none."""
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
    }


def _group(results: Sequence[RequestResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_errors": len(results) - len(ok),
        "ttft_s": latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": latency_stats([t for r in ok if (t := r.tpot_s) is not None]),
        "e2e_s": latency_stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        "output_tokens": sum(r.output_tokens or 0 for r in ok),
    }


def _instances(timeline: Sequence[TimelineSample]) -> dict[str, float] | None:
    counts = [s.num_instances for s in timeline if s.num_instances is not None]
    if not counts:
        return None
    return {"mean": statistics.fmean(counts), "min": min(counts), "max": max(counts)}


def summarize(
    results: Sequence[RequestResult], duration_s: float, timeline: Sequence[TimelineSample] = ()
) -> dict[str, Any]:
    """Overall and per-priority latency statistics, throughput, errors and
    (when recorded) the mean instance count over the samples."""
    overall = _group(results)
    ok = [r for r in results if r.ok]
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    priorities = [p.value for p in Priority if any(r.priority == p.value for r in results)]
    errors = collections.Counter(r.error for r in results if r.error is not None)
    return {
        **overall,
        "duration_s": duration_s,
        "requests_per_s": len(ok) * per_s,
        "output_tokens_per_s": overall["output_tokens"] * per_s,
        "prompt_tokens_per_s": sum(r.prompt_tokens for r in ok) * per_s,
        "num_short": sum((r.output_tokens or 0) < r.output_tokens_requested for r in ok),
        "send_lag_s": latency_stats(
            [r.sent_s - r.scheduled_s for r in results if r.sent_s is not None]
        ),
        "errors": dict(errors.most_common(10)),
        "by_priority": {p: _group([r for r in results if r.priority == p]) for p in priorities},
        "instances": _instances(timeline),
    }


def render_summary(summary: dict[str, Any]) -> str:
    """A text table of a summary (latencies in ms)."""
    lines = [
        f"{summary['num_requests']} requests: {summary['num_ok']} ok, "
        f"{summary['num_errors']} errors in {summary['duration_s']:.1f} s; "
        f"{summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.0f} output tok/s",
        f"{'metric':6} {'class':8} {'n':>6} {'mean ms':>10} {'p50 ms':>10} {'p90 ms':>10} "
        f"{'p99 ms':>10}",
    ]
    by_priority = summary["by_priority"]
    groups = [("all", summary), *(by_priority.items() if len(by_priority) > 1 else [])]
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        for name, group in groups:
            stats = group[metric]
            cells = (
                ["-"] * 4
                if stats is None
                else [f"{1000 * stats[k]:.1f}" for k in ("mean", "p50", "p90", "p99")]
            )
            lines.append(
                f"{metric[:-2].upper():6} {name:8} {group['num_ok']:>6} "
                + " ".join(f"{c:>10}" for c in cells)
            )
    lag = summary["send_lag_s"]
    if lag is not None:
        lines.append(
            f"send lag behind the trace schedule: p50 {1000 * lag['p50']:.1f} ms, "
            f"p99 {1000 * lag['p99']:.1f} ms"
        )
    if summary["instances"]:
        inst = summary["instances"]
        lines.append(f"instances: mean {inst['mean']:.2f}, min {inst['min']}, max {inst['max']}")
    lines += [f"error x{count}: {message}" for message, count in summary["errors"].items()]
    return "\n".join(lines)


# -- output files ----------------------------------------------------------------
def plot_latency_cdfs(run: RunResult, path: Path) -> None:
    """CDFs of TTFT, TPOT and end-to-end latency, overall and per priority."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ok = [r for r in run.requests if r.ok]
    classes = sorted({r.priority for r in ok}, key=lambda p: Priority(p).rank)
    groups = [("all", ok)] + (
        [(p, [r for r in ok if r.priority == p]) for p in classes] if len(classes) > 1 else []
    )
    for ax, (title, metric) in zip(
        axes,
        [
            ("time to first token", "ttft_s"),
            ("time per output token", "tpot_s"),
            ("end-to-end latency", "e2e_s"),
        ],
        strict=True,
    ):
        for name, group in groups:
            values = sorted(v * 1000 for r in group if (v := getattr(r, metric)) is not None)
            if values:
                ys = [0.0] + [(i + 1) / len(values) for i in range(len(values))]
                ax.step([values[0], *values], ys, where="post", label=f"{name} (n={len(values)})")
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(run: RunResult, path: Path) -> None:
    """Requests in flight and (when recorded) instance counts over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_instances = any(s.num_instances is not None for s in run.timeline)
    fig, axes = plt.subplots(
        2 if with_instances else 1,
        1,
        figsize=(9, 5 if with_instances else 3),
        sharex=True,
        squeeze=False,
    )
    ts = [s.t_s for s in run.timeline]
    axes[0][0].step(ts, [s.in_flight for s in run.timeline], where="post", color="#3b7dd8")
    axes[0][0].set_ylabel("requests in flight")
    if with_instances:
        ax = axes[1][0]
        ax.step(ts, [s.num_instances for s in run.timeline], where="post", label="registered")
        ax.step(ts, [s.num_active for s in run.timeline], where="post", label="active", ls="--")
        ax.set_ylabel("instances")
        ax.set_ylim(bottom=0, top=max(s.num_instances or 0 for s in run.timeline) + 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left", fontsize=8)
    axes[-1][0].set_xlabel("seconds since start")
    for (ax,) in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(run: RunResult, out_dir: Path) -> list[Path]:
    """``results.json``, ``latency_cdf.png`` and ``timeline.png`` in ``out_dir``
    (plots are skipped, with a warning, when matplotlib is missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    results.write_text(json.dumps(run.to_json(), indent=1))
    written = [results]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots")
        return written
    plot_latency_cdfs(run, out_dir / "latency_cdf.png")
    written.append(out_dir / "latency_cdf.png")
    if len(run.timeline) > 1:
        plot_timeline(run, out_dir / "timeline.png")
        written.append(out_dir / "timeline.png")
    return written

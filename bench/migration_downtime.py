"""Live migration cost versus sequence length (the analogue of Llumnix's
Figure 10): downtime (the request makes no progress, from the freeze on the
source to the first token on the destination), total migration time, and the
source's decode slowdown while the live stages copy, for KV transfer and for
recompute. Two real vLLM CPU instances with the tiny model, one core each.
A KV migration's downtime is split into its parts: the source's stop (the
engine's abort), the final copy (the destination pulls the blocks left),
the commit's round trip, the destination's admission, its wait for the
engine to schedule the request, the load of the staged blocks into the cache
and the rest of the first step (the tail's forward and the output's way back).

    .venv/bin/python -m bench.migration_downtime [--lengths 256,1024,4096,8192,15000]
        [--pace-mib-s 0] [--transport tcp]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import PLOTS, REPO, Server, free_port
from infra.cluster_auth import RESUME_TOKEN_HEADER
from infra.embedded_redis import EmbeddedRedis
from infra.procs import shoal_command
from infra.settings import CommonSettings

LOGS = REPO / "bench" / "out"
BLOCK = 32


def _instance(name: str, core: int, redis_url: str, pace_mib_s: float,
              transport: str) -> Server:  # fmt: skip
    port = free_port()
    cmd = [*shoal_command(), "instance", "--engine", "vllm", "--port", str(port),
           "--instance-id", name, "--cpu-threads-bind", str(core), "--block-size", str(BLOCK),
           "--max-model-len", "16384", "--max-num-seqs", "4",
           "--kv-cache-bytes", str(512 * 1024 * 1024), "--kv-pace-mib-s", str(pace_mib_s),
           "--kv-transport", transport]  # fmt: skip
    env = {"SHOAL_REDIS_URL": redis_url, "SHOAL_DTYPE": "float32", "SHOAL_NAMESPACE": "bench"}
    return Server(cmd, f"http://127.0.0.1:{port}/ready", env, LOGS / f"mig-{name}.log")


RESUME_TOKEN = "migration-downtime-bench"
"""This benchmark is its requests' gateway: it resumes them with this."""


def _stream(url: str, body: dict[str, Any] | None, arrivals: list[float],
            stop: threading.Event | None = None) -> str:  # fmt: skip
    """Read one NDJSON stream, stamping each token's arrival; returns the
    instance the request moved to ('' when it finished or was stopped)."""
    method = "POST" if body else "GET"
    with (
        httpx.Client(
            timeout=300,
            headers={
                **CommonSettings().cluster_keys().headers(),
                RESUME_TOKEN_HEADER: RESUME_TOKEN,
            },
        ) as client,
        client.stream(method, url, json=body) as resp,
    ):
        for line in resp.iter_lines():
            if stop is not None and stop.is_set():
                return ""
            if not line:
                continue
            chunk = json.loads(line)
            if chunk.get("migrated_to"):
                return str(chunk["migrated_to"])
            arrivals.extend(time.monotonic() for _ in chunk.get("token_ids", []))
    return ""


def _stall(arrivals: list[float], frozen: float) -> float:
    """The gap in the client's tokens around ``frozen`` (nan if none)."""
    before = [t for t in arrivals if t <= frozen]
    after = [t for t in arrivals if t > frozen]
    return after[0] - before[-1] if before and after else float("nan")


def _mean_gap(arrivals: list[float], start: float, end: float) -> float | None:
    gaps = [b - a for a, b in itertools.pairwise(arrivals) if start < a and b <= end]
    return statistics.mean(gaps) if len(gaps) >= 3 else None


def _one(src: str, dst: str, length: int, mode: str, rid: str) -> dict[str, Any]:
    """Start a request with a ``length``-token prompt on ``src``, migrate it
    to ``dst`` after 64 output tokens, and time it. A bystander request
    decoding on ``src`` in the same batch measures the source's decode
    slowdown while the live stages copy (its token gaps during the copy
    against those while both decoded before it, from the migrated request's
    32nd token on)."""
    rng = random.Random(rid)  # a prompt of its own: no instance has it cached
    prompt = [rng.randrange(3, 320) for _ in range(length)]
    body = {"prompt": prompt, "max_tokens": 400, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "migratable": True, "request_id": rid,
            "resume_token": RESUME_TOKEN}  # fmt: skip
    bystander_body = {"prompt": [rng.randrange(3, 320) for _ in range(64)], "max_tokens": 8000,
                      "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    seen: list[float] = []
    stop = threading.Event()
    # Daemons: a failed stream must end the run, not leave these waiting forever.
    bystander = threading.Thread(target=_stream, args=(src + "/generate", bystander_body, seen,
                                                       stop), daemon=True)  # fmt: skip
    bystander.start()
    while len(seen) < 32:  # it runs before the migrated request arrives
        time.sleep(0.01)
    arrivals: list[float] = []
    record: dict[str, Any] = {}
    call: list[float] = []

    def migrate() -> None:
        while len(arrivals) < 64:
            time.sleep(0.002)
        call.append(time.monotonic())
        r = httpx.post(src + "/migrate", json={"destination": dst, "request_ids": [rid],
                                                "mode": mode},
                       headers=CommonSettings().cluster_keys().headers(), timeout=300)  # fmt: skip
        call.append(time.monotonic())
        record.update(r.json()[0])

    mover = threading.Thread(target=migrate, daemon=True)
    mover.start()
    moved_to = _stream(src + "/generate", body, arrivals)
    if moved_to:
        _stream(f"{moved_to}/resume/{rid}", None, arrivals)
    mover.join()
    stop.set()
    bystander.join()
    cached_ttft = _ttft(dst, prompt)
    t_call, t_done = call
    # The record's downtime_s is the source's share (freeze to hand-off); the
    # client sees the gap from its last token before the freeze to its first
    # token from the destination.
    frozen = t_done - (record.get("downtime_s") or 0.0)
    # Baseline: both requests decoding, before any copy (from the migrated
    # request's 32nd token on, so its prefill is not in the window).
    base = _mean_gap(seen, arrivals[31], t_call)
    during = _mean_gap(seen, t_call, frozen)
    slowdown = during / base - 1 if base and during else None
    return {"length": length, "mode": mode, "outcome": record.get("outcome"),
            "downtime_ms": 1000 * _stall(arrivals, frozen), "step_ms": 1000 * (base or 0.0),
            **_parts(record, dst), "cached_ttft_ms": 1000 * cached_ttft,
            "total_ms": 1000 * record.get("duration_s", float("nan")),
            "stages": record.get("stages"), "blocks": record.get("blocks"),
            "slowdown_pct": None if slowdown is None else 100 * slowdown,
            "tokens": len(arrivals)}  # fmt: skip


def _ttft(url: str, prompt: list[int]) -> float:
    """Time to the first token of a new request for ``prompt`` on ``url``,
    where the migration left its blocks in the prefix cache: what vLLM takes
    to start any request whose KV is already there (the floor of the part of
    the downtime on the destination)."""
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    t0 = time.monotonic()
    headers = CommonSettings().cluster_keys().headers()
    with (
        httpx.Client(timeout=300, headers=headers) as client,
        client.stream("POST", url + "/generate", json=body) as resp,
    ):
        for line in resp.iter_lines():
            if line and json.loads(line).get("token_ids"):
                return time.monotonic() - t0
    return float("nan")


PARTS = ("stop", "final_copy", "commit", "admit", "wait", "load", "first_step")


def _parts(record: dict[str, Any], dst: str) -> dict[str, float]:
    """The downtime's parts in ms: the source's (its record) and the
    destination's (its arrival record of the same key)."""
    src_parts = record.get("downtime") or {}
    arrival: dict[str, Any] = {}
    deadline = time.monotonic() + 5
    while not arrival and time.monotonic() < deadline:  # completed at the first token there
        arrivals = (
            httpx.get(
                dst + "/migrations", timeout=30, headers=CommonSettings().cluster_keys().headers()
            )
            .json()
            .get("arrivals", [])
        )
        arrival = next((a for a in arrivals if a["key"] == record.get("key")), {})
        time.sleep(0.05)
    load = arrival.get("load_s") or 0.0
    wait = arrival.get("wait_s") or 0.0
    first_step = arrival.get("first_step_s")
    rest = None if first_step is None else first_step - load - wait
    ms = {"stop": src_parts.get("stop_s"), "final_copy": src_parts.get("final_copy_s"),
          "commit": src_parts.get("commit_s"), "admit": src_parts.get("admit_s"),
          "wait": wait, "load": load, "first_step": rest}  # fmt: skip
    ms["freeze_to_first"] = arrival.get("downtime_s")
    return {f"{k}_ms": float("nan") if v is None else 1000 * v for k, v in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="256,1024,4096,8192,15000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="kv,recompute")
    parser.add_argument(
        "--pace-mib-s", type=float, default=0.0, help="the instances' kv_pace_mib_s (0: unbounded)"
    )
    parser.add_argument("--transport", default="tcp", help="the instances' kv_transport")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    LOGS.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis.start(Path(tmp) / "valkey")
        a = _instance("mig-a", 0, redis.url, args.pace_mib_s, args.transport)
        b = _instance("mig-b", 1, redis.url, args.pace_mib_s, args.transport)
        try:
            a.wait_ready()
            b.wait_ready()
            n = 0
            for length in lengths:
                for mode in args.modes.split(","):
                    for i in range(args.repeats):
                        src, dst = (a, b) if i % 2 == 0 else (b, a)
                        n += 1
                        row = _one(src.base_url, dst.base_url, length, mode, f"m{n}")
                        print(row, flush=True)
                        rows.append(row)
        finally:
            a.stop()
            b.stop()
            redis.stop()
    _report(rows, lengths)
    _report_parts(rows, lengths)


def _report_parts(rows: list[dict[str, Any]], lengths: list[int]) -> None:
    """The KV migrations' downtime in its parts (medians, ms), against the
    source's decode step before the migration: the downtime (freeze on the
    source to the first token on the destination, as the destination records
    it), the destination's time to first token for a new request of the same
    prompt with its KV cached (vLLM's floor for starting a request), and the
    gap in the client's tokens (which adds up to one decode step before the
    freeze and the client's reconnection to the destination)."""
    print(f"\n{'tokens':>7} {'decode step':>11} " + " ".join(f"{p:>10}" for p in PARTS)
          + f" {'downtime':>9} {'cached TTFT':>11} {'client gap':>10}")  # fmt: skip
    for length in lengths:
        ok = [r for r in rows if r["length"] == length and r["mode"] == "kv"
              and r["outcome"] == "migrated"]  # fmt: skip
        if not ok:
            continue

        def med(name: str, rs: list[dict[str, Any]] = ok) -> float:
            values = [r[name] for r in rs if r[name] == r[name]]  # not nan
            return statistics.median(values) if values else float("nan")

        print(f"{length:>7} {med('step_ms'):>11.1f} "
              + " ".join(f"{med(p + '_ms'):>10.1f}" for p in PARTS)
              + f" {med('freeze_to_first_ms'):>9.1f} {med('cached_ttft_ms'):>11.1f}"
              f" {med('downtime_ms'):>10.1f}")  # fmt: skip


def _report(rows: list[dict[str, Any]], lengths: list[int]) -> None:
    print(f"\n{'tokens':>7} {'mode':<10} {'downtime ms':>12} {'total ms':>9} {'blocks':>7} "
          f"{'stages':>6} {'source slowdown':>16} {'migrated':>9}")  # fmt: skip
    series: dict[str, list[float]] = {"kv": [], "recompute": []}
    for length in lengths:
        for mode in ("kv", "recompute"):
            rs = [r for r in rows if r["length"] == length and r["mode"] == mode]
            ok = [r for r in rs if r["outcome"] == "migrated"]
            down = statistics.median(r["downtime_ms"] for r in ok) if ok else float("nan")
            total = statistics.median(r["total_ms"] for r in ok) if ok else float("nan")
            slows = [r["slowdown_pct"] for r in ok if r["slowdown_pct"] is not None]
            slow = f"{statistics.median(slows):+.1f} %" if slows else "-"
            blocks = statistics.median(r["blocks"] or 0 for r in ok) if ok else 0
            stages = statistics.median(r["stages"] or 0 for r in ok) if ok else 0
            series[mode].append(down)
            print(f"{length:>7} {mode:<10} {down:>12.1f} {total:>9.1f} {blocks:>7.0f} "
                  f"{stages:>6.0f} {slow:>16} {len(ok)}/{len(rs):>7}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, ys in series.items():
        ax.plot(lengths, ys, marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("downtime (ms, median)")
    ax.set_title("Migration downtime vs sequence length (vLLM CPU, tiny model)")
    ax.legend()
    fig.tight_layout()
    path = PLOTS / "migration_downtime.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

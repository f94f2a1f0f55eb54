"""The whole soak: start the cluster, compute the references, run the phases
that were asked for, check for leaks, stop every process, then judge, print
the table and write ``results.json`` (and a plot) under the output
directory. Returns the exit code: 0 clean, 1 something lost, corrupted,
errored, leaked or crashed, 2 clean but short of a target, 130 interrupted."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from bench.common import REPO
from bench.soak.accounting import (
    Judgement,
    Phase,
    Reference,
    StreamOutcome,
    StreamResult,
    Summary,
    Targets,
    base_request_id,
    classify,
    judge,
    render_table,
    summarize,
    to_json,
)
from bench.soak.cluster import Cluster, ClusterSpec
from bench.soak.drive import (
    Context,
    DriveConfig,
    Http,
    Records,
    check_leaks,
    compute_references,
    drains_phase,
    kills_phase,
    migrations_phase,
    note_crashes,
)
from bench.soak.plan import make_prompts
from infra.settings import CommonSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoakConfig:
    engine: str = "vllm"
    instances: int = 2
    max_num_seqs: int = 4
    max_model_len: int = 2048
    prompts: int = 128
    prompt_lengths: tuple[int, int] = (16, 200)
    max_tokens: tuple[int, ...] = (128, 256)
    targets: Targets = field(default_factory=Targets)
    drive: DriveConfig = field(default_factory=lambda: DriveConfig(concurrency=16))
    phase_time_s: dict[str, float] = field(default_factory=dict)
    """Time budget per phase (seconds); a phase stops at its target or its budget."""
    max_duration_s: float = 7200.0
    """No phase starts, and a running one stops, past this (from the start)."""
    compare: str = "exact"
    """``exact``: text, usage and finish reason; ``usage``: usage and finish
    reason only, for an engine whose greedy output is not a function of the
    context alone (both of Shoal's are)."""
    sim_speedup: float = 1.0
    block_size: int | None = None
    kv_cache_bytes: int | None = None
    out: Path | None = None

    @property
    def compare_text(self) -> bool:
        return self.compare == "exact"


def default_out(engine: str) -> Path:
    return REPO / "bench" / "out" / "soak" / f"{time.strftime('%Y%m%d-%H%M%S')}-{engine}"


def run_soak(config: SoakConfig) -> int:
    out = config.out or default_out(config.engine)
    out.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec(
        engine=config.engine, instances=config.instances, max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len, namespace=f"soak-{uuid.uuid4().hex[:6]}",
        out_dir=out, sim_speedup=config.sim_speedup, block_size=config.block_size,
        kv_cache_bytes=config.kv_cache_bytes,
    )  # fmt: skip
    cluster, records = Cluster(spec), Records()
    fatal, interrupted = None, False
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        asyncio.run(_soak(cluster, config, records))
    except KeyboardInterrupt:
        interrupted = True
        print("shoal bench soak: interrupted; stopping everything", file=sys.stderr)
    except Exception as exc:  # the soak could not go on: still judge what it saw
        fatal = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        cluster.close()
        signal.signal(signal.SIGTERM, previous)
    summary, judgement, outcomes = judge_records(config, records, fatal=fatal,
                                                 interrupted=interrupted)  # fmt: skip
    print(render_table(summary, judgement))
    for path in write_results(out, spec, config, records, summary, judgement, outcomes):
        print(f"wrote {path}")
    return 130 if interrupted else judgement.exit_code


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def _soak(cluster: Cluster, config: SoakConfig, records: Records) -> None:
    print(f"starting {config.instances} {config.engine} instance(s), a gateway and Valkey "
          f"(logs: {cluster.spec.logs})", flush=True)  # fmt: skip
    await cluster.start()
    prompts = make_prompts(config.prompts, seed=config.drive.seed,
                           lengths=config.prompt_lengths, max_tokens=config.max_tokens)  # fmt: skip
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, headers=CommonSettings().cluster_keys().headers()
    ) as session:
        ctx = Context(cluster, Http(session), config.drive, prompts, records,
                      cluster.spec.served_model, random.Random(config.drive.seed))  # fmt: skip
        print(f"computing {len(prompts)} references ...", flush=True)
        await compute_references(ctx)
        phases = ((Phase.MIGRATIONS, config.targets.migrations, migrations_phase),
                  (Phase.KILLS, config.targets.kills, kills_phase),
                  (Phase.DRAINS, config.targets.drains, drains_phase))  # fmt: skip
        for phase, target, run in phases:
            if not target or records.now() >= config.max_duration_s:
                continue
            budget = config.phase_time_s.get(phase.value, config.max_duration_s)
            deadline = min(records.now() + budget, config.max_duration_s)
            print(f"phase {phase.value}: target {target}, budget {deadline - records.now():.0f}s",
                  flush=True)  # fmt: skip
            await run(ctx, target, deadline)
            await _replace_crashed(ctx)
        print("checking every instance for leaks ...", flush=True)
        await check_leaks(ctx)


async def _replace_crashed(ctx: Context) -> None:
    """An instance that died by itself is a failure; the next phase still gets
    all its instances."""
    for slot in note_crashes(ctx):
        await ctx.cluster.relaunch(slot)
    await ctx.cluster.wait_gateway_sees(len(ctx.cluster.slots))


# -- judging and writing ----------------------------------------------------------
def judge_records(
    config: SoakConfig, records: Records, *, fatal: str | None = None, interrupted: bool = False
) -> tuple[Summary, Judgement, list[tuple[StreamResult, StreamOutcome, bool]]]:
    outcomes = []
    for r in records.streams:
        ref = records.references.get(r.prompt)
        outcome = classify(r, ref, compare_text=config.compare_text)
        outcomes.append((r, outcome, ref is not None and r.text != ref.text))
    summary = summarize(
        outcomes, records.migrations, records.kills, records.drains, records.leak_checks,
        autoscaler_errors=len(records.autoscaler_events),
        reference_mismatches=len(records.reference_mismatches), crashes=len(records.crashes),
        fatal=fatal, interrupted=interrupted,
    )  # fmt: skip
    return summary, judge(summary, config.targets), outcomes


def first_difference(expected: str, got: str) -> dict[str, Any]:
    """Where two texts part, and how long a tail they share: a long common
    tail after a short difference suggests the same tokens rendered to
    different text; no common tail, different tokens."""
    i = next((k for k, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
             min(len(expected), len(got)))  # fmt: skip
    tail = next((k for k, (a, b) in enumerate(zip(reversed(expected), reversed(got),
                                                  strict=False)) if a != b),
                min(len(expected), len(got)))  # fmt: skip
    return {"at_char": i, "expected": expected[max(0, i - 20) : i + 40],
            "got": got[max(0, i - 20) : i + 40], "expected_chars": len(expected),
            "got_chars": len(got), "common_tail_chars": tail}  # fmt: skip


def _stream_row(r: StreamResult, outcome: StreamOutcome, ref: Reference | None,
                moves: dict[str, list[int]]) -> dict[str, Any]:  # fmt: skip
    row = {k: v for k, v in to_json(r).items() if k != "text"}
    row.update(
        outcome=outcome.value, text_chars=len(r.text), migrations=moves.get(r.request_id or "", [])
    )
    if outcome is StreamOutcome.CORRUPTED and ref is not None:
        row["difference"] = {**first_difference(ref.text, r.text),
                             "expected_usage": to_json(ref.usage),
                             "expected_finish": ref.finish_reason,
                             "expected_text": ref.text, "got_text": r.text}  # fmt: skip
    return row


def write_results(out: Path, cluster: ClusterSpec, config: SoakConfig, records: Records,
                  summary: Summary,
                  judgement: Judgement, outcomes: list[tuple[StreamResult, StreamOutcome, bool]],
                  ) -> list[Path]:  # fmt: skip
    import json

    moves: dict[str, list[int]] = {}
    for i, m in enumerate(records.migrations):
        moves.setdefault(base_request_id(m.request_id), []).append(i)
    doc = {
        "config": to_json(config) | {"out": str(out)},
        "cluster": {"namespace": cluster.namespace, "logs": str(cluster.logs)},
        "summary": to_json(summary),
        "verdict": {"failures": list(judgement.failures), "missed": list(judgement.missed),
                    "exit_code": judgement.exit_code},
        "phases": records.phases,
        "reference_mismatches": records.reference_mismatches,
        "crashes": records.crashes,
        "autoscaler_error_events": records.autoscaler_events,
        "kills": to_json(records.kills),
        "drains": to_json(records.drains),
        "leak_checks": to_json(records.leak_checks),
        "migrations": to_json(records.migrations),
        "streams": [_stream_row(r, o, records.references.get(r.prompt), moves)
                    for r, o, _ in outcomes],
    }  # fmt: skip
    path = out / "results.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    written = [path]
    plot = _plot(out / "migrations.png", records)
    if plot is not None:
        written.append(plot)
    return written


def _plot(path: Path, records: Records) -> Path | None:
    """Cumulative migrations by outcome over the run, kills and drain cycles
    marked below; skipped without matplotlib (a dev dependency)."""
    if not records.migrations and not records.kills and not records.drains:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for outcome in sorted({m.outcome for m in records.migrations}):
        ts = [m.t_s for m in records.migrations if m.outcome == outcome]
        ax.step(ts, range(1, len(ts) + 1), where="post", label=outcome)
    # The autoscaler's drain migrations, counted per cycle at its end.
    for outcome in sorted({o for d in records.drains for o in d.autoscaler_outcomes}):
        ends: list[float] = []
        total: list[int] = []
        for d in records.drains:
            if d.autoscaler_outcomes.get(outcome):
                ends.append(d.t_s + d.duration_s)
                total.append((total[-1] if total else 0) + d.autoscaler_outcomes[outcome])
        ax.step(ends, total, where="post", ls="--", label=f"autoscaler: {outcome}")
    for k in records.kills:
        ax.axvline(k.t_s, color="#c44e52", alpha=0.4, lw=0.8)
    for d in records.drains:
        ax.axvline(d.t_s, color="#8c8c8c", alpha=0.25, lw=0.6)
    ax.set_xlabel("time since start (s); red: kills, grey: drain cycles")
    ax.set_ylabel("migrations (cumulative)")
    ax.set_title("Soak: migrations by outcome")
    if records.migrations or records.drains:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

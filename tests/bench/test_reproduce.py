"""``bench.reproduce`` (Llumnix's evaluation in the simulator) on tiny traces,
and the simulator's ``priorities`` switch it uses for Figure 13. Structure and
behaviour only, no timing assertions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from autoscaler.policies import ScalingConfig
from bench import reproduce
from bench.simulator import simulate
from bench.simulator.cli import main as simulate_main
from bench.simulator.config import SimulationConfig
from bench.traces import Gamma, PriorityMix, TraceConfig, TraceRequest, generate_trace, uniform
from infra.records import Priority
from instance.engine import EngineRequest
from instance.sim.core import SimCore


def bursty_trace(n: int = 120, high: float = 0.2) -> list[TraceRequest]:
    """Bursts of long prompts that fill two instances' KV and queue, a fifth
    of them high priority."""
    config = TraceConfig(n, Gamma(40.0, 4.0), uniform(1000, 2000), uniform(50, 150),
                         PriorityMix(high=high), seed=3)  # fmt: skip
    return list(generate_trace(config).requests)


def two_instances(*, priorities: bool = True) -> SimulationConfig:
    scaling = ScalingConfig(min_instances=2, max_instances=2)
    return SimulationConfig(num_instances=2, scaling_config=scaling, priorities=priorities)


def test_without_priorities_high_requests_are_served_as_normal_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    added: list[Priority] = []
    original = SimCore.add

    def add(self: SimCore, request: EngineRequest) -> None:
        added.append(request.priority)
        original(self, request)

    monkeypatch.setattr(SimCore, "add", add)
    result = simulate(bursty_trace(), two_instances(priorities=False))
    assert added and set(added) == {Priority.NORMAL}
    highs = [r for r in result.requests if r.priority == "high"]
    assert highs and all(r.effective_priority == "normal" for r in highs)
    assert set(result.summary["by_priority"]) == {"high", "normal"}
    added.clear()
    simulate(bursty_trace(), two_instances())
    assert Priority.HIGH in added


def test_without_priorities_the_run_equals_an_all_normal_trace() -> None:
    trace = bursty_trace()
    normal = [replace(r, priority=Priority.NORMAL) for r in trace]
    off = simulate(trace, two_instances(priorities=False))
    plain = simulate(normal, two_instances())
    assert [(r.ttft_s, r.e2e_s) for r in off.requests] == [
        (r.ttft_s, r.e2e_s) for r in plain.requests
    ]
    assert off.summary["simulation"] == plain.summary["simulation"]


def test_with_priorities_high_requests_go_first() -> None:
    trace = bursty_trace()
    on = simulate(trace, two_instances()).summary["by_priority"]
    off = simulate(trace, two_instances(priorities=False)).summary["by_priority"]
    assert on["high"]["ttft_s"]["mean"] < on["normal"]["ttft_s"]["mean"]
    assert on["high"]["ttft_s"]["mean"] < off["high"]["ttft_s"]["mean"]


def test_cli_no_priorities_flag(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    argv = ["--rate", "20", "--num-requests", "30", "--lengths", "S-S", "--instances", "2",
            "--high-fraction", "0.5", "--no-priorities", "--out", str(out)]  # fmt: skip
    assert simulate_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["config"]["priorities"] is False
    assert {r["effective_priority"] for r in data["requests"]} == {"normal"}


def test_serving_rows_cover_every_system_and_rate() -> None:
    rows = reproduce.serving(30, 0, {"S-S": (2.0, 4.0)})
    assert [(r.rate, r.load) for r in rows[:: len(reproduce.SYSTEMS)]] == [
        (2.0, "moderate"),
        (4.0, "near saturation"),
    ]
    assert [r.system for r in rows[:4]] == [s.label for s in reproduce.SYSTEMS]
    assert all(r.latency.num_ok == 30 for r in rows)
    assert all(r.num_migrated == 0 for r in rows if r.system != reproduce.LLUMNIX.label)
    tables = reproduce.serving_tables(rows)
    assert "P99 TTFT ratio" in tables and "14.8x" in tables and "34.4x" in tables


def test_priorities_rows_split_high_and_normal_both_ways() -> None:
    rows = reproduce.priorities(40, 0, rates=(30.0,))
    keys = [(r.mode, r.group) for r in rows]
    assert keys == [
        (m, g) for m in ("with priorities", "without") for g in ("all", "high", "normal")
    ]
    by = {(r.mode, r.group): r.latency for r in rows}
    for mode in ("with priorities", "without"):
        assert by[(mode, "high")].num_ok + by[(mode, "normal")].num_ok == by[(mode, "all")].num_ok
    assert "P99 TTFT" in reproduce.priority_tables(rows)


def test_phased_trace_follows_the_phases() -> None:
    trace = reproduce.phased_trace("gamma", (1.0, 10.0, 1.0), 120, 0).requests
    duration = 120 / 12
    counts = [sum(i * duration <= r.arrival_s < (i + 1) * duration for r in trace)
              for i in range(3)]  # fmt: skip
    assert sum(counts) == len(trace)
    assert counts[1] > counts[0] and counts[1] > counts[2]
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)


def test_autoscaling_rows_and_savings_against_static(tmp_path: Path) -> None:
    rows = reproduce.autoscaling(40, 0, arrivals=("poisson",), rates=(1.0, 6.0, 1.0))
    labels = [r.policy for r in rows]
    assert labels == [s.label for s in reproduce.scaling_runs()]
    static = rows[labels.index(f"static {reproduce.PEAK_INSTANCES}")]
    assert static.saving == 0.0 and static.mean_instances == reproduce.PEAK_INSTANCES
    assert all(r.saving > 0 for r in rows if "band" in r.policy)
    assert "goal" in reproduce.scaling_tables(rows)


def test_reproduce_writes_json_and_a_plot(tmp_path: Path) -> None:
    tables = reproduce.reproduce("priorities", 20, 0, out_dir=tmp_path, plot_dir=tmp_path)
    data = json.loads((tmp_path / "priorities.json").read_text())
    assert data["experiment"] == "priorities" and data["rows"]
    assert (tmp_path / "sim_priorities.png").stat().st_size > 0
    assert "with priorities" in tables

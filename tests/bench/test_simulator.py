"""The cluster simulator: deterministic, every request served exactly, the
mechanism (migration, scaling, scale to zero) behaves, and it drives the live
system's registered policy objects rather than copies of them. Small traces,
no timing assertions (``python -m bench.simulator.perf`` prints the speed)."""

from __future__ import annotations

import ast
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import autoscaler.policies.pairing as pairing
import autoscaler.policies.scaling as scaling
import autoscaler.policies.tick as tick
import bench.simulator.cluster as sim_cluster
import bench.simulator.instance as sim_instance
import bench.simulator.migration as sim_migration
import instance.reporter
import migration.policies as selection
from autoscaler.policies import PairingConfig, ScalingConfig
from bench.simulator.cli import main
from bench.simulator.cluster import Simulator
from bench.simulator.config import SimulationConfig
from bench.simulator.results import SimulationResult
from bench.traces import (
    Gamma,
    Poisson,
    PriorityMix,
    TraceConfig,
    TraceRequest,
    generate_trace,
    preset_lengths,
    uniform,
)
from gateway.policies import DISPATCH, Llumnix
from infra.records import Priority

SIMULATOR_DIR = Path(__file__).resolve().parents[2] / "bench" / "simulator"


def mm_trace(n: int, rate: float, seed: int = 0, high: float = 0.0) -> list[TraceRequest]:
    """Llumnix's M-M lengths (Zipf, means 256/256), Poisson arrivals."""
    config = TraceConfig(n, Poisson(rate), *preset_lengths("M-M"), PriorityMix(high=high),
                         seed=seed)  # fmt: skip
    return list(generate_trace(config).requests)


def static(n: int, **kw: Any) -> SimulationConfig:
    return SimulationConfig(
        num_instances=n, scaling_config=ScalingConfig(min_instances=n, max_instances=n), **kw
    )


def run(trace: list[TraceRequest], config: SimulationConfig) -> tuple[Simulator, SimulationResult]:
    sim = Simulator(trace, config)
    result = sim.run()
    for inst in sim.instances.values():  # nothing leaks: blocks, pins, staging, reservations
        inst.core.check_invariants()
        assert inst.is_empty, inst.instance_id
        assert inst.core.num_free_blocks == config.hardware.num_blocks
    assert not sim.held and not sim.migrations.busy
    return sim, result


def assert_all_served(result: SimulationResult) -> None:
    assert result.summary["num_errors"] == 0
    for r in result.requests:
        assert r.ok and r.output_tokens == r.output_tokens_requested, r
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s <= r.e2e_s


def dumps(result: SimulationResult) -> str:
    return json.dumps(result.to_json(), sort_keys=True)


# -- determinism and exactness ---------------------------------------------------
def test_same_seed_same_results_other_seed_differs() -> None:
    def once(seed: int) -> str:
        config = static(4, dispatch="random", seed=seed)
        return dumps(run(mm_trace(300, 4.0, seed=seed, high=0.1), config)[1])

    first = once(1)
    assert once(1) == first
    assert once(2) != first


def test_every_request_gets_exactly_its_output_tokens() -> None:
    _, result = run(mm_trace(300, 3.0, high=0.2), static(4))
    assert_all_served(result)
    assert result.summary["num_ok"] == 300
    assert set(result.summary["by_priority"]) == {"high", "normal"}
    total = sum(r.output_tokens for r in mm_trace(300, 3.0, high=0.2))
    assert result.summary["output_tokens"] == total


def test_static_scaling_keeps_the_instance_count() -> None:
    _, result = run(mm_trace(200, 3.0), static(3))
    assert {s.num_instances for s in result.timeline} == {3}
    assert {s.num_active for s in result.timeline} == {3}
    cost = result.summary["simulation"]["cost"]
    assert cost["mean_instances"] == pytest.approx(3.0)
    assert cost["instance_seconds"] == pytest.approx(3 * result.summary["duration_s"])
    assert not cost["decisions"]


# -- migration ---------------------------------------------------------------------
def test_skewed_load_migrates_and_migrated_requests_finish_exactly() -> None:
    # Round-robin ignores load, so heavy-tailed requests pile up on some instances.
    sim, result = run(mm_trace(400, 4.0), static(4, dispatch="round-robin"))
    assert_all_served(result)
    mig = result.summary["simulation"]["migration"]
    assert mig["num_migrated"] > 0 and mig["modes"].get("kv", 0) > 0
    assert mig["kv_bytes"] > 0 and mig["downtime_s"] is not None
    moved = [r for r in sim.requests if r.num_migrations]
    assert moved and all(r.num_output == r.trace.output_tokens for r in moved)
    # KV moved: a destination prefilled only the tail, so downtime stays below
    # a recompute of the context (at most a few steps).
    assert mig["downtime_s"]["p50"] < 0.5


def test_recompute_migration_also_finishes_exactly() -> None:
    config = static(4, dispatch="round-robin", migration_mode="recompute")
    _, result = run(mm_trace(300, 4.0), config)
    assert_all_served(result)
    mig = result.summary["simulation"]["migration"]
    assert mig["num_migrated"] > 0 and set(mig["modes"]) == {"recompute"}
    assert mig["kv_bytes"] == 0


def test_no_migration_moves_nothing() -> None:
    config = static(4, dispatch="round-robin", migration=False)
    _, result = run(mm_trace(300, 4.0), config)
    assert_all_served(result)
    assert result.summary["simulation"]["migration"]["num_decisions"] == 0


# -- scaling -----------------------------------------------------------------------
def bursty_then_quiet() -> list[TraceRequest]:
    """A burst of 250 requests in ~8 s, then one every 3 s for 3 minutes."""
    burst = generate_trace(TraceConfig(250, Gamma(30.0, 2.0), uniform(200, 400),
                                       uniform(200, 400), seed=3)).requests  # fmt: skip
    end = burst[-1].arrival_s
    quiet = [TraceRequest(end + 3.0 * (i + 1), 100, 50) for i in range(60)]
    return [*burst, *quiet]


def test_band_scaling_scales_out_under_a_burst_and_back_in() -> None:
    config = SimulationConfig(
        num_instances=1, scaling="band", cold_start_s=5.0,
        scaling_config=ScalingConfig(min_instances=1, max_instances=4, cooldown_s=5.0,
                                     scale_in_ticks=4),
    )  # fmt: skip
    _, result = run(bursty_then_quiet(), config)
    assert_all_served(result)
    counts = [s.num_instances or 0 for s in result.timeline]
    peak = counts.index(max(counts))
    assert max(counts) > 1
    assert min(counts[peak:]) < max(counts)
    decisions = result.summary["simulation"]["cost"]["decisions"]
    assert decisions["ScaleOut"] >= 1 and decisions["Drain"] >= 1 and decisions["Stop"] >= 1
    assert 1 < result.summary["simulation"]["cost"]["mean_instances"] < max(counts)


def test_a_cold_start_longer_than_the_start_timeout_never_serves() -> None:
    """The live start-timeout rule: each scale-out's instance is stopped
    before it becomes active, and the one instance there is serves all."""
    config = SimulationConfig(
        num_instances=1, scaling="band", cold_start_s=30.0,
        scaling_config=ScalingConfig(min_instances=1, max_instances=2, cooldown_s=5.0,
                                     start_timeout_s=10.0),
    )  # fmt: skip
    sim, result = run(bursty_then_quiet(), config)
    assert_all_served(result)
    decisions = result.summary["simulation"]["cost"]["decisions"]
    assert decisions["ScaleOut"] >= 1 and decisions["StopStarting"] == decisions["ScaleOut"]
    assert max(s.num_active or 0 for s in result.timeline) == 1
    assert max(s.num_instances or 0 for s in result.timeline) == 2  # launched, then stopped
    assert set(sim.instances) == {"sim-001"}


def test_scale_to_zero_holds_requests_and_serves_them_after_the_cold_start() -> None:
    early = [TraceRequest(0.1 * i, 50, 20) for i in range(5)]
    late = [TraceRequest(300.0 + 0.1 * i, 50, 20) for i in range(5)]
    config = SimulationConfig(
        num_instances=0, scaling="band", cold_start_s=20.0,
        scaling_config=ScalingConfig(min_instances=0, max_instances=2, idle_timeout_s=10.0,
                                     cooldown_s=1.0),
    )  # fmt: skip
    _, result = run(early + late, config)
    assert_all_served(result)
    assert all(r.ttft_s is not None and r.ttft_s >= 20.0 - 0.5 for r in result.requests)
    assert result.summary["simulation"]["cost"]["num_held"] == 10
    between = [s.num_instances for s in result.timeline if 100.0 < s.t_s < 290.0]
    assert between and set(between) == {0}
    assert result.summary["simulation"]["cost"]["mean_instances"] < 1.0


# -- the live system's policies, not copies ------------------------------------------
def recorder(fn: Callable[..., Any], calls: Counter[str], name: str) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def test_the_simulator_calls_the_registered_policy_objects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: Counter[str] = Counter()
    monkeypatch.setattr(Llumnix, "rank", recorder(Llumnix.rank, calls, "dispatch"))
    for registry, name, kind in ((scaling.SCALING, "band", "scaling"),
                                 (pairing.PAIRING, "llumnix", "pairing"),
                                 (selection.SELECTION, "lcfs", "selection")):  # fmt: skip
        entries: dict[str, Any] = registry._entries
        monkeypatch.setitem(entries, name, recorder(entries[name], calls, kind))
    config = SimulationConfig(
        num_instances=4, scaling="band", dispatch="llumnix", pairing="llumnix",
        scaling_config=ScalingConfig(min_instances=1, max_instances=4),
        pairing_config=PairingConfig(migrate_out_below=10.0, migrate_in_above=20.0),
    )  # fmt: skip
    _, result = run(mm_trace(300, 4.0), config)
    assert_all_served(result)
    assert calls["dispatch"] == 300
    assert calls["scaling"] > 0 and calls["pairing"] == calls["scaling"]
    assert calls["selection"] > 0
    # Load figures and migration mode come from the live modules themselves.
    assert vars(sim_instance)["make_report"] is instance.reporter.make_report
    assert vars(sim_migration)["choose_mode"] is selection.choose_mode
    assert vars(sim_migration)["select"] is selection.select
    assert vars(sim_migration)["may_move_high"] is pairing.may_move_high
    assert vars(sim_cluster)["decide"] is tick.decide


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name for node in ast.walk(tree) if isinstance(node, kinds)}


def test_no_policy_is_reimplemented_in_the_simulator() -> None:
    registered = {
        *(scaling.SCALING.get(n).__name__ for n in scaling.SCALING.names()),
        *(pairing.PAIRING.get(n).__name__ for n in pairing.PAIRING.names()),
        *(selection.SELECTION.get(n).__name__ for n in selection.SELECTION.names()),
        *(DISPATCH.get(n).__name__ for n in DISPATCH.names()),
    }
    live_functions = {
        "rank", "effective_freeness", "freeness", "virtual_usage", "request_virtual_usage",
        "count_by_priority", "make_report", "select", "choose_mode", "cheapest_to_empty",
        "may_move_high", "start_timeouts", "decide",
    }  # fmt: skip
    forbidden = registered | live_functions
    sources = sorted(SIMULATOR_DIR.glob("*.py"))
    assert len(sources) > 5
    for path in sources:
        clash = _defined_names(path) & forbidden
        assert not clash, f"{path.name} defines {sorted(clash)}: import the live policy instead"
        text = path.read_text()
        for registrar in (".register(", "(DispatchPolicy"):
            assert registrar not in text, f"{path.name} registers a policy of its own"
    assert all(not DISPATCH.get(n).__module__.startswith("bench.") for n in DISPATCH.names())


# -- the command line ----------------------------------------------------------------
def test_cli_runs_an_inline_trace_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    code = main(["--rate", "2", "--num-requests", "60", "--instances", "2", "--high-fraction",
                 "0.2", "--dispatch", "least-load", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "preemption:" in printed and "cost:" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["num_ok"] == 60 and len(data["requests"]) == 60
    assert data["config"]["dispatch"] == "least-load"
    assert data["trace_header"]["num_requests"] == 60
    assert data["summary"]["by_priority"]["high"]["num_requests"] == 12
    assert Priority.HIGH.value in data["summary"]["by_priority"]


def test_cli_refuses_a_missing_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--num-requests", "10"]) == 1
    assert "--rate" in capsys.readouterr().err


# -- the slo policy over a rising and falling trace ------------------------------
def _first_growth(result: SimulationResult, start: int) -> float:
    return next(s.t_s for s in result.timeline if (s.num_instances or 0) > start)


def test_the_slo_policy_scales_out_ahead_of_a_ramp_and_back_in_after_it() -> None:
    from bench.reproduce import phased_trace

    trace = list(phased_trace("poisson", [1, 2, 4, 7, 10, 7, 4, 2, 1], 6000, seed=0).requests)
    results = {}
    for policy in ("band", "slo"):
        config = SimulationConfig(
            num_instances=2, scaling=policy, cold_start_s=30.0,
            scaling_config=ScalingConfig(min_instances=1, max_instances=16, freeness_low=40,
                                         freeness_high=200, cooldown_s=5.0),
        )  # fmt: skip
        sim, result = run(trace, config)
        assert_all_served(result)
        results[policy] = (sim, result)
    sim, result = results["slo"]
    counts = [s.num_instances or 0 for s in result.timeline]
    assert max(counts) > 2 and counts[-1] < max(counts)  # out with the ramp, in after it
    assert sim.decisions["ScaleOut"] > 0 and sim.decisions["Drain"] > 0
    assert sim.decisions["Migrate"] > 0  # drains move requests away
    # It starts instances before the reactive band does, on the same trace.
    assert _first_growth(result, 2) < _first_growth(results["band"][1], 2)

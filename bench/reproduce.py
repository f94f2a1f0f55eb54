"""Llumnix's evaluation (OSDI '24), reproduced in the cluster simulator.

Three experiments, each a function that runs ``bench.simulator.simulate`` and
returns rows, and a report that prints markdown tables, writes the rows as
JSON under ``bench/out/reproduce/`` and a plot under ``docs/bench/``:

* ``serving`` (Figure 11): Llumnix dispatch with migration against load-aware
  dispatch without migration (INFaaS++: ``least-load``, pairing ``none``),
  freeness dispatch without migration, and ``round-robin``, on 16 LLaMA-7B /
  A10 instances, for Zipf length sets and the ShareGPT / BurstGPT fits, at a
  moderate rate and one near saturation each;
* ``priorities`` (Figure 13): 10 % high-priority requests under bursty Gamma
  arrivals, with priority support (the engine's priority queue, the
  dispatch headroom, the pairing policy's protection) and without
  (``SimulationConfig.priorities=False``: everything served as normal);
* ``autoscaling`` (Figures 14/15): the ``band`` scaling policy for several
  freeness bands against static provisioning at the peak, under Poisson and
  Gamma arrivals whose rate alternates between low and high phases.

    .venv/bin/python -m bench.reproduce {serving,priorities,autoscaling,all} \\
        [--num-requests N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from autoscaler.policies import ScalingConfig
from bench.simulator import simulate
from bench.simulator.config import SimulationConfig
from bench.simulator.results import SimulationResult
from bench.traces import (
    Gamma,
    Poisson,
    PriorityMix,
    Trace,
    TraceConfig,
    TraceRequest,
    generate_trace,
    preset_lengths,
)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "reproduce"
PLOTS = REPO / "docs" / "bench"

PAPER_P99_TTFT_VS_INFAAS = 14.8
PAPER_P99_TTFT_VS_ROUND_ROBIN = 34.4
PAPER_COST_SAVING = 0.36


# -- runs and metrics ------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    """Latencies of a group of requests (seconds)."""

    num_ok: int
    ttft_mean: float
    ttft_p99: float
    tpot_mean: float
    tpot_p99: float
    e2e_mean: float
    e2e_p99: float


def metrics(group: dict[str, Any]) -> Metrics:
    """The mean and P99 of TTFT, TPOT and e2e of a summary (or a priority group)."""

    def stat(name: str, key: str) -> float:
        stats = group[name]
        return math.nan if stats is None else float(stats[key])

    return Metrics(
        group["num_ok"], stat("ttft_s", "mean"), stat("ttft_s", "p99"), stat("tpot_s", "mean"),
        stat("tpot_s", "p99"), stat("e2e_s", "mean"), stat("e2e_s", "p99"),
    )  # fmt: skip


def make_trace(
    lengths: str, rate: float, num_requests: int, seed: int, *, cv: float | None = None,
    high_fraction: float = 0.0,
) -> Trace:  # fmt: skip
    """A Poisson (or, with ``cv``, Gamma) trace of a named length preset."""
    process = Poisson(rate) if cv is None else Gamma(rate, cv)
    prompt, output = preset_lengths(lengths)
    mix = PriorityMix(high=high_fraction)
    config = TraceConfig(num_requests, process, prompt, output, mix, seed=seed,
                         lengths_preset=lengths)  # fmt: skip
    return generate_trace(config)


def run(trace: Sequence[TraceRequest], config: SimulationConfig, label: str) -> SimulationResult:
    """One simulation, with a progress line."""
    result = simulate(trace, config)
    s = result.summary
    print(f"  {label}: {len(trace)} requests, {s['duration_s']:.0f} s simulated in "
          f"{result.wall_s:.1f} s", flush=True)  # fmt: skip
    return result


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds:.2f} s" if seconds >= 1 else f"{1000 * seconds:.0f} ms"


def _ratio(baseline: float, ours: float) -> str:
    if ours <= 0 or math.isnan(baseline) or math.isnan(ours):
        return "-"
    return f"{baseline / ours:.1f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _save_json(name: str, payload: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- serving (Figure 11) ----------------------------------------------------------------
@dataclass(frozen=True)
class System:
    """A serving configuration under comparison."""

    label: str
    dispatch: str
    pairing: str
    migration: bool

    def config(self, seed: int) -> SimulationConfig:
        return SimulationConfig(num_instances=16, dispatch=self.dispatch, pairing=self.pairing,
                                migration=self.migration, seed=seed)  # fmt: skip


LLUMNIX = System("llumnix", "llumnix", "llumnix", True)
INFAAS = System("infaas++", "least-load", "none", False)
FREENESS = System("freeness, no migration", "llumnix", "none", False)
ROUND_ROBIN = System("round-robin", "round-robin", "none", False)
SYSTEMS = (LLUMNIX, INFAAS, FREENESS, ROUND_ROBIN)
PAPER_RATIOS = {INFAAS.label: f"{PAPER_P99_TTFT_VS_INFAAS}x",
                ROUND_ROBIN.label: f"{PAPER_P99_TTFT_VS_ROUND_ROBIN}x"}  # fmt: skip

WORKLOADS: dict[str, tuple[float, float]] = {
    "M-M": (10.0, 12.0),
    "L-L": (3.0, 4.5),
    "S-L": (4.5, 5.5),
    "sharegpt": (8.0, 13.0),
    "burstgpt": (8.0, 13.0),
}
"""Length preset -> (moderate, near-saturation) Poisson rates for 16 instances,
found with short Llumnix runs and checked with 5,000-request ones: near
saturation, Llumnix's P99 TTFT is a few to ~15 s; 10 % more load (M-M at 14,
S-L at 6.5) overloads every system, whose queues then grow with the run."""


@dataclass(frozen=True)
class ServingRow:
    workload: str
    rate: float
    load: str
    """``moderate`` or ``near saturation``."""
    system: str
    latency: Metrics
    preemption_loss_s: float
    """Mean per request."""
    num_migrated: int
    wall_s: float


def serving(
    num_requests: int = 5000, seed: int = 0,
    workloads: dict[str, tuple[float, float]] | None = None,
    systems: Sequence[System] = SYSTEMS,
) -> list[ServingRow]:  # fmt: skip
    """Every system on every workload at both of its rates."""
    rows = []
    for workload, rates in (WORKLOADS if workloads is None else workloads).items():
        for rate, load in zip(rates, ("moderate", "near saturation"), strict=False):
            trace = make_trace(workload, rate, num_requests, seed).requests
            for system in systems:
                label = f"{workload} {rate:g} req/s {system.label}"
                result = run(trace, system.config(seed), label)
                sim = result.summary["simulation"]
                loss = sim["preemption"]["loss_s_per_request"]
                rows.append(ServingRow(
                    workload, rate, load, system.label, metrics(result.summary),
                    0.0 if loss is None else loss["mean"], sim["migration"]["num_migrated"],
                    result.wall_s,
                ))  # fmt: skip
    return rows


def _by_run(rows: Sequence[ServingRow]) -> dict[tuple[str, float], dict[str, ServingRow]]:
    runs: dict[tuple[str, float], dict[str, ServingRow]] = {}
    for r in rows:
        runs.setdefault((r.workload, r.rate), {})[r.system] = r
    return runs


def serving_tables(rows: Sequence[ServingRow]) -> str:
    """The latency table and the ratio table (baseline / llumnix)."""
    latency = _table(
        ["workload", "req/s", "system", "TTFT mean", "TTFT p99", "TPOT mean", "TPOT p99",
         "e2e mean", "e2e p99", "preemption loss/req", "migrations"],
        [[r.workload, f"{r.rate:g}", r.system, _ms(r.latency.ttft_mean), _ms(r.latency.ttft_p99),
          _ms(r.latency.tpot_mean), _ms(r.latency.tpot_p99), _ms(r.latency.e2e_mean),
          _ms(r.latency.e2e_p99), _ms(r.preemption_loss_s), str(r.num_migrated)] for r in rows],
    )  # fmt: skip
    ratio_rows = []
    for (workload, rate), runs in _by_run(rows).items():
        ours = runs.get(LLUMNIX.label)
        if ours is None:
            continue
        for base in (b for b in SYSTEMS if b is not LLUMNIX and b.label in runs):
            b, o = runs[base.label].latency, ours.latency
            paper = PAPER_RATIOS.get(base.label, "-")
            ratio_rows.append([
                workload, f"{rate:g}", base.label, _ratio(b.ttft_p99, o.ttft_p99),
                _ratio(b.ttft_mean, o.ttft_mean), _ratio(b.tpot_p99, o.tpot_p99),
                _ratio(b.e2e_p99, o.e2e_p99), _ratio(b.e2e_mean, o.e2e_mean), paper,
            ])  # fmt: skip
    ratios = _table(
        ["workload", "req/s", "baseline", "P99 TTFT ratio", "mean TTFT ratio", "P99 TPOT ratio",
         "P99 e2e ratio", "mean e2e ratio", "paper (P99 TTFT, up to)"], ratio_rows,
    )  # fmt: skip
    return latency + "\n\nBaseline / llumnix (higher: Llumnix better)\n\n" + ratios


def plot_serving(rows: Sequence[ServingRow], path: Path) -> None:
    """P99 TTFT (log scale) per workload and system, one panel per load level."""
    plt = _pyplot()
    loads = ("moderate", "near saturation")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    labels = list(dict.fromkeys(r.system for r in rows))
    for ax, load in zip(axes, loads, strict=True):
        subset = [r for r in rows if r.load == load]
        names = list(dict.fromkeys(f"{r.workload}\n{r.rate:g}/s" for r in subset))
        width = 0.8 / max(len(labels), 1)
        for k, label in enumerate(labels):
            values = [r.latency.ttft_p99 for r in subset if r.system == label]
            xs = [i + k * width for i in range(len(values))]
            ax.bar(xs, values, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_title(f"P99 TTFT, {load} (16 x LLaMA-7B/A10, simulated)")
    axes[0].set_ylabel("seconds")
    axes[0].legend(fontsize=8)
    _save_fig(plt, fig, path)


def _save_fig(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- priorities (Figure 13) -------------------------------------------------------------
PRIORITY_LENGTHS = "M-M"
PRIORITY_RATES = (11.0, 14.0, 17.0)
PRIORITY_CV = 4.0
HIGH_FRACTION = 0.1


@dataclass(frozen=True)
class PriorityRow:
    rate: float
    mode: str
    """``with priorities`` or ``without``."""
    group: str
    """``high``, ``normal`` or ``all``."""
    latency: Metrics


def priorities(
    num_requests: int = 5000, seed: int = 0, rates: Sequence[float] = PRIORITY_RATES
) -> list[PriorityRow]:
    """Llumnix with and without priority support on the same bursty trace."""
    rows = []
    for rate in rates:
        trace = make_trace(PRIORITY_LENGTHS, rate, num_requests, seed, cv=PRIORITY_CV,
                           high_fraction=HIGH_FRACTION).requests  # fmt: skip
        for mode, on in (("with priorities", True), ("without", False)):
            config = replace(LLUMNIX.config(seed), priorities=on)
            summary = run(trace, config, f"{rate:g} req/s gamma cv {PRIORITY_CV:g} {mode}").summary
            rows.append(PriorityRow(rate, mode, "all", metrics(summary)))
            for group in ("high", "normal"):
                if group in summary["by_priority"]:
                    rows.append(PriorityRow(rate, mode, group,
                                            metrics(summary["by_priority"][group])))  # fmt: skip
    return rows


def priority_tables(rows: Sequence[PriorityRow]) -> str:
    latency = _table(
        ["req/s", "mode", "class", "n", "TTFT mean", "TTFT p99", "TPOT mean", "TPOT p99",
         "e2e mean", "e2e p99"],
        [[f"{r.rate:g}", r.mode, r.group, str(r.latency.num_ok), _ms(r.latency.ttft_mean),
          _ms(r.latency.ttft_p99), _ms(r.latency.tpot_mean), _ms(r.latency.tpot_p99),
          _ms(r.latency.e2e_mean), _ms(r.latency.e2e_p99)] for r in rows],
    )  # fmt: skip
    found = {(r.rate, r.mode, r.group): r.latency for r in rows}
    ratio_rows = []
    for rate in dict.fromkeys(r.rate for r in rows):
        for group in ("high", "normal"):
            on = found.get((rate, "with priorities", group))
            off = found.get((rate, "without", group))
            if on is None or off is None:
                continue
            ratio_rows.append([
                f"{rate:g}", group, _ratio(off.ttft_p99, on.ttft_p99),
                _ratio(off.ttft_mean, on.ttft_mean), _ratio(off.tpot_p99, on.tpot_p99),
                _ratio(off.e2e_p99, on.e2e_p99), _ratio(off.e2e_mean, on.e2e_mean),
            ])  # fmt: skip
    ratios = _table(["req/s", "class", "P99 TTFT", "mean TTFT", "P99 TPOT", "P99 e2e", "mean e2e"],
                    ratio_rows)  # fmt: skip
    return (
        latency + "\n\nWithout / with priorities (above 1: faster with priorities; the "
        "paper: high 3.6-10x at P99 prefill, normal at most 13 % slower)\n\n" + ratios
    )


def plot_priorities(rows: Sequence[PriorityRow], path: Path) -> None:
    """P99 TTFT and e2e of high and normal requests, with and without priorities."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    subset = [r for r in rows if r.group != "all"]
    names = list(dict.fromkeys(f"{r.group}\n{r.rate:g}/s" for r in subset))
    for ax, (attr, title) in zip(axes, (("ttft_p99", "P99 TTFT"), ("e2e_p99", "P99 e2e")),
                                 strict=True):  # fmt: skip
        for k, mode in enumerate(("with priorities", "without")):
            values = [getattr(r.latency, attr) for r in subset if r.mode == mode]
            ax.bar([i + 0.4 * k for i in range(len(values))], values, 0.4, label=mode)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.set_title(f"{title}, 10 % high, gamma CV {PRIORITY_CV:g} (simulated)")
    axes[0].legend(fontsize=8)
    _save_fig(plt, fig, path)


# -- autoscaling (Figures 14/15) --------------------------------------------------------
SCALING_LENGTHS = "M-M"
PHASE_RATES = (2.0, 4.0, 6.0, 8.0, 10.0, 10.0, 8.0, 6.0, 4.0, 2.0) * 2
"""Requests per second of the phases, all of equal length: two cycles of a
ramp up and down. The peak is the serving experiment's moderate M-M rate, for
which 16 instances keep P99 TTFT near a second (14 req/s saturates them); the
trough needs about three."""
SCALING_CV = 4.0
BANDS: tuple[tuple[float, float], ...] = ((5.0, 40.0), (10.0, 60.0), (20.0, 120.0),
                                          (40.0, 200.0), (80.0, 300.0))  # fmt: skip
"""(freeness_low, freeness_high) of the ``band`` policy; (10, 60) is Llumnix's."""
STATIC_COUNTS = (16, 10)
PEAK_INSTANCES = 16
BAND_INITIAL_INSTANCES = 4


def phased_trace(
    arrivals: str, rates: Sequence[float], num_requests: int, seed: int,
    lengths: str = SCALING_LENGTHS,
) -> Trace:  # fmt: skip
    """Phases of equal length at ``rates``, about ``num_requests`` in all: each
    phase is its own trace (Poisson, or Gamma of CV ``SCALING_CV``), cut at the
    phase's end and shifted to its start."""
    duration = num_requests / sum(rates)
    requests: list[TraceRequest] = []
    for i, rate in enumerate(rates):
        cv = SCALING_CV if arrivals == "gamma" else None
        n = max(2, math.ceil(duration * rate * 1.5))
        part = make_trace(lengths, rate, n, seed + i, cv=cv).requests
        requests += [replace(r, arrival_s=round(r.arrival_s + i * duration, 6))
                     for r in part if r.arrival_s < duration]  # fmt: skip
    return Trace(None, tuple(requests))


@dataclass(frozen=True)
class ScalingRow:
    arrivals: str
    policy: str
    mean_instances: float
    instance_seconds: float
    saving: float
    """Fraction of instance-seconds saved against static at the peak."""
    max_instances: int
    scale_outs: int
    drains: int
    latency: Metrics


@dataclass(frozen=True)
class ScalingRun:
    label: str
    band: tuple[float, float] | None
    """None: static provisioning of ``instances``."""
    instances: int
    """Active at time 0."""
    system: System = LLUMNIX

    def config(self, seed: int) -> SimulationConfig:
        base = self.system.config(seed)
        if self.band is None:
            scaling = ScalingConfig(min_instances=self.instances, max_instances=self.instances)
            return replace(base, num_instances=self.instances, scaling_config=scaling)
        scaling = ScalingConfig(min_instances=1, max_instances=PEAK_INSTANCES,
                                freeness_low=self.band[0], freeness_high=self.band[1])  # fmt: skip
        return replace(base, num_instances=self.instances, scaling="band", scaling_config=scaling)


def scaling_runs() -> list[ScalingRun]:
    """Static at the peak and below it, Llumnix's band policy for every band,
    and INFaaS++ (least-load, no migration: a drained instance empties as its
    requests finish) with Llumnix's band."""
    runs = [ScalingRun(f"static {n}", None, n) for n in STATIC_COUNTS]
    runs += [ScalingRun(f"band {lo:g}:{hi:g}", (lo, hi), BAND_INITIAL_INSTANCES)
             for lo, hi in BANDS]  # fmt: skip
    runs.append(ScalingRun("infaas++ band 10:60", (10.0, 60.0), BAND_INITIAL_INSTANCES, INFAAS))
    return runs


def autoscaling(
    num_requests: int = 8000, seed: int = 0, arrivals: Sequence[str] = ("poisson", "gamma"),
    rates: Sequence[float] = PHASE_RATES,
) -> list[ScalingRow]:  # fmt: skip
    """Static provisioning against the band policy over a phased trace."""
    rows = []
    for kind in arrivals:
        trace = phased_trace(kind, rates, num_requests, seed).requests
        static_cost = math.nan
        for spec in scaling_runs():
            result = run(trace, spec.config(seed), f"{kind} {spec.label}")
            cost = result.summary["simulation"]["cost"]
            if spec.label == f"static {PEAK_INSTANCES}":
                static_cost = cost["instance_seconds"]
            rows.append(ScalingRow(
                kind, spec.label, cost["mean_instances"], cost["instance_seconds"],
                1.0 - cost["instance_seconds"] / static_cost, cost["max_instances"],
                cost["decisions"].get("ScaleOut", 0), cost["decisions"].get("Drain", 0),
                metrics(result.summary),
            ))  # fmt: skip
    return rows


def scaling_tables(rows: Sequence[ScalingRow]) -> str:
    table = _table(
        ["arrivals", "policy", "mean instances", "instance-s", "saving vs static 16",
         "max", "scale-outs", "drains", "TTFT mean", "TTFT p99", "TPOT p99", "e2e mean", "e2e p99"],
        [[r.arrivals, r.policy, f"{r.mean_instances:.2f}", f"{r.instance_seconds:.0f}",
          f"{100 * r.saving:.0f} %", str(r.max_instances), str(r.scale_outs), str(r.drains),
          _ms(r.latency.ttft_mean), _ms(r.latency.ttft_p99), _ms(r.latency.tpot_p99),
          _ms(r.latency.e2e_mean), _ms(r.latency.e2e_p99)] for r in rows],
    )  # fmt: skip
    return table + "\n\n" + "\n".join(scaling_verdicts(rows))


def scaling_verdicts(rows: Sequence[ScalingRow]) -> list[str]:
    """Per arrival kind: is the goal (>= 36 % fewer instance-seconds at a P99
    TTFT no worse than static at the peak) met by some band?"""
    lines = []
    for kind in dict.fromkeys(r.arrivals for r in rows):
        static = next((r for r in rows if r.arrivals == kind
                       and r.policy == f"static {PEAK_INSTANCES}"), None)  # fmt: skip
        if static is None:
            continue
        bands = [r for r in rows if r.arrivals == kind and "band" in r.policy]
        met = [r.policy for r in bands if r.saving >= PAPER_COST_SAVING
               and r.latency.ttft_p99 <= static.latency.ttft_p99]  # fmt: skip
        lines.append(f"{kind}: goal (>= {100 * PAPER_COST_SAVING:.0f} % saving at P99 TTFT <= "
                     f"static's {_ms(static.latency.ttft_p99)}) "
                     + (f"met by {', '.join(met)}" if met else "not met by any band"))  # fmt: skip
    return lines


def plot_autoscaling(rows: Sequence[ScalingRow], path: Path) -> None:
    """Cost (mean instances) against P99 TTFT, one panel per arrival kind."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(r.arrivals for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for r in (r for r in rows if r.arrivals == kind):
            marker = "s" if r.policy.startswith("static") else "o"
            ax.scatter(r.mean_instances, r.latency.ttft_p99, marker=marker)
            ax.annotate(r.policy, (r.mean_instances, r.latency.ttft_p99), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("average instances (cost)")
        ax.set_ylabel("P99 TTFT (s)")
        ax.set_title(f"{kind}: rates {'/'.join(f'{x:g}' for x in PHASE_RATES)} req/s")
    _save_fig(plt, fig, path)


# -- the command ------------------------------------------------------------------------
@dataclass(frozen=True)
class Experiment:
    run: Callable[[int, int], Sequence[Any]]
    tables: Callable[[Any], str]
    plot: Callable[[Any, Path], None]
    default_requests: int


EXPERIMENTS: dict[str, Experiment] = {
    "serving": Experiment(lambda n, s: serving(n, s), serving_tables, plot_serving, 5000),
    "priorities": Experiment(lambda n, s: priorities(n, s), priority_tables, plot_priorities, 5000),
    "autoscaling": Experiment(
        lambda n, s: autoscaling(n, s), scaling_tables, plot_autoscaling, 8000
    ),
}


def reproduce(name: str, num_requests: int | None, seed: int, out_dir: Path = OUT,
              plot_dir: Path = PLOTS) -> str:  # fmt: skip
    """Run one experiment, write its JSON and plot, return its tables."""
    exp = EXPERIMENTS[name]
    n = exp.default_requests if num_requests is None else num_requests
    print(f"== {name}: {n} requests a run, seed {seed}", flush=True)
    t0 = time.perf_counter()
    rows = exp.run(n, seed)
    wall = time.perf_counter() - t0
    payload = {"experiment": name, "num_requests": n, "seed": seed, "wall_s": wall,
               "rows": [asdict(r) for r in rows]}  # fmt: skip
    json_path = _save_json(name, payload, out_dir)
    plot_path = plot_dir / f"sim_{name}.png"
    exp.plot(rows, plot_path)
    tables = exp.tables(rows)
    print(f"\n{tables}\n\n({name}: {wall:.0f} s; wrote {json_path} and {plot_path})\n", flush=True)
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--num-requests", type=int, help="per run (default: per experiment)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for name in names:
        reproduce(name, args.num_requests, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

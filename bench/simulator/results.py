"""What a simulation reports: the load generator's summary (``bench.loadgen
.summarize``: TTFT, TPOT, end-to-end latency, throughput, errors, overall and
per priority) over per-request results in its format, plus what only a
simulator sees: preemption loss, migrations and cost.

Definitions (times in virtual seconds from the trace's start):

* TTFT = first token - arrival (held time and cold starts included);
  TPOT = (e2e - TTFT) / (output tokens - 1); e2e = last token - arrival.
* Preemption loss of a request: for each preemption (recompute), the time
  from it until the request's next token, i.e. waiting to be readmitted plus
  recomputing its context. Reported as total, mean per request (all
  requests; Llumnix's metric) and per preempted request; recomputed tokens
  count the context re-prefilled.
* Downtime of a migration: from the stop on the source to the first token on
  the destination.
* Cost: instance-seconds (every instance that exists, starting or draining
  too, as the autoscaler accounts it) and their time-weighted mean, the
  average instance count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bench.loadgen import RequestResult, TimelineSample, latency_stats, render_summary, summarize
from bench.simulator.requests import RequestState

if TYPE_CHECKING:
    from bench.simulator.cluster import Simulator


@dataclass
class SimulationResult:
    config: dict[str, Any]
    requests: list[RequestResult]
    summary: dict[str, Any]
    timeline: list[TimelineSample]
    wall_s: float
    """Real seconds the run took (not part of the deterministic output)."""
    num_events: int

    def to_json(self, *, with_requests: bool = True) -> dict[str, Any]:
        """Everything but the wall time: equal for equal inputs."""
        out: dict[str, Any] = {"config": self.config, "summary": self.summary,
                               "timeline": [asdict(s) for s in self.timeline]}  # fmt: skip
        if with_requests:
            out["requests"] = [r.to_json() for r in self.requests]
        return out

    def render(self) -> str:
        return render_summary(self.summary) + "\n" + render_simulation(self.summary["simulation"])


def request_result(req: RequestState) -> RequestResult:
    """A request in the load generator's result format."""
    arrival = req.arrival_s
    done = req.error is None and req.finish_s is not None
    return RequestResult(
        index=req.index, priority=req.trace.priority.value, prompt_tokens=req.trace.prompt_tokens,
        output_tokens_requested=req.trace.output_tokens, scheduled_s=arrival, sent_s=arrival,
        ttft_s=None if req.first_token_s is None else req.first_token_s - arrival,
        e2e_s=req.finish_s - arrival if done and req.finish_s is not None else None,
        output_tokens=req.num_output if done else None, finish_reason="length" if done else None,
        status=200 if done else None, effective_priority=req.priority.value, error=req.error,
    )  # fmt: skip


def _preemption(requests: list[RequestState]) -> dict[str, Any]:
    losses = [r.preemption_loss_s for r in requests]
    hit = [r.preemption_loss_s for r in requests if r.num_preemptions]
    return {
        "num_preemptions": sum(r.num_preemptions for r in requests),
        "num_requests_preempted": len(hit),
        "loss_s_total": sum(losses),
        "loss_s_per_request": latency_stats(losses),
        "loss_s_per_preempted_request": latency_stats(hit),
        "recomputed_tokens": sum(r.recomputed_tokens for r in requests),
    }


def _migration(sim: Simulator) -> dict[str, Any]:
    m = sim.migrations
    downtimes = [d for r in sim.requests for d in r.downtimes_s]
    return {
        "num_decisions": m.num_decisions,
        "num_migrated": m.outcomes.get("migrated", 0),
        "num_requests_migrated": sum(1 for r in sim.requests if r.num_migrations),
        "outcomes": dict(sorted(m.outcomes.items())),
        "modes": dict(sorted(m.modes.items())),
        "kv_bytes": m.num_bytes,
        "downtime_s": latency_stats(downtimes),
    }


def _cost(sim: Simulator) -> dict[str, Any]:
    duration = sim.end_s
    return {
        "instance_seconds": sim.instance_seconds,
        "mean_instances": sim.instance_seconds / duration if duration > 0 else 0.0,
        "max_instances": sim.max_instances,
        "final_instances": len(sim.instances),
        "num_held": sim.num_held_total,
        "decisions": dict(sorted(sim.decisions.items())),
    }


def collect(sim: Simulator, *, wall_s: float) -> SimulationResult:
    results = [request_result(r) for r in sim.requests]
    summary = summarize(results, sim.end_s, sim.timeline)
    summary["simulation"] = {
        "preemption": _preemption(sim.requests),
        "migration": _migration(sim),
        "cost": _cost(sim),
        "num_events": sim.queue.num_events,
    }
    return SimulationResult(asdict(sim.config), results, summary, sim.timeline, wall_s,
                            sim.queue.num_events)  # fmt: skip


def _ms(stats: dict[str, float] | None, key: str) -> str:
    return "-" if stats is None else f"{1000 * stats[key]:.1f}"


def render_simulation(sim: dict[str, Any]) -> str:
    """The simulator's own lines under the load generator's table."""
    p, m, c = sim["preemption"], sim["migration"], sim["cost"]
    loss = p["loss_s_per_request"]
    outcomes = ", ".join(f"{k} {v}" for k, v in m["outcomes"].items()) or "none"
    modes = ", ".join(f"{k} {v}" for k, v in m["modes"].items()) or "none"
    decisions = ", ".join(f"{k} {v}" for k, v in c["decisions"].items()) or "none"
    return "\n".join([
        f"preemption: {p['num_preemptions']} of {p['num_requests_preempted']} requests, "
        f"loss {p['loss_s_total']:.1f} s total, {_ms(loss, 'mean')} ms mean per request "
        f"(p99 {_ms(loss, 'p99')} ms), {p['recomputed_tokens']} tokens recomputed",
        f"migration: {m['num_migrated']} moves of {m['num_requests_migrated']} requests "
        f"({modes}; outcomes: {outcomes}); downtime mean {_ms(m['downtime_s'], 'mean')} ms, "
        f"p99 {_ms(m['downtime_s'], 'p99')} ms; {m['kv_bytes'] / 1e9:.1f} GB of KV moved",
        f"cost: {c['mean_instances']:.2f} instances on average, {c['instance_seconds']:.0f} "
        f"instance-seconds, max {c['max_instances']}; {c['num_held']} requests held; "
        f"decisions: {decisions}",
    ])  # fmt: skip

"""The pure parts of ``bench.validate_sim`` (the calibration fits), on data
made with known coefficients. The live part needs two vLLM engines and runs
as a benchmark, not here."""

from __future__ import annotations

import pytest

from bench import validate_sim as vs
from bench.simulator import simulate
from instance.sim.latency import LatencyModel

MODEL = LatencyModel(step_base_s=0.005, prefill_per_token_s=4e-5, decode_per_seq_s=5e-4,
                     decode_per_context_token_s=1e-6)  # fmt: skip


def calibration() -> vs.Calibration:
    return vs.Calibration(MODEL, 0.012, 0.007, 0.001, {})


def test_bursts_of_the_decode_trace_are_found_back_from_their_start_times() -> None:
    trace = vs.decode_trace()
    seen = {(vs.burst_of(r.arrival_s), r.prompt_tokens) for r in trace.requests}
    assert {(b, b.prompt_tokens) for b in vs.BURSTS} == seen
    sizes: dict[float, int] = {}
    for r in trace.requests:
        sizes[r.arrival_s] = sizes.get(r.arrival_s, 0) + 1
    assert all(vs.burst_of(t).batch == n for t, n in sizes.items())


def test_decode_fit_recovers_the_coefficients() -> None:
    samples = [
        (b, MODEL.step_duration_s(num_prefill_tokens=0, num_decode_seqs=b.batch,
                                  num_context_tokens=round(b.batch * b.mean_context_tokens)))
        for b in vs.BURSTS
    ]  # fmt: skip
    base, per_seq, per_context = vs.fit_decode(samples)
    assert base == pytest.approx(MODEL.step_base_s, rel=1e-3)
    assert per_seq == pytest.approx(MODEL.decode_per_seq_s, rel=1e-3)
    assert per_context == pytest.approx(MODEL.decode_per_context_token_s, rel=1e-3)


@pytest.mark.parametrize("slowdown", [0.8, 1.0, 1.7])
def test_slowdown_and_overhead_fits_recover_a_simulated_measurement(slowdown: float) -> None:
    """A "measurement" simulated with a known slowdown and overhead is fitted back."""
    cal, trace = calibration(), vs.make_trace(60, 3.0, seed=1)
    truth = vs.hardware(cal, 256, 2048, slowdown)
    measured = simulate(trace.requests, vs.sim_config(truth, 0)).summary
    fitted = vs.fit_slowdown(cal, 256, 2048, trace, measured["tpot_s"]["mean"], 0)
    assert fitted == pytest.approx(slowdown, rel=0.01)
    hw = vs.hardware(cal, 256, 2048, fitted)
    overhead = vs.fit_overhead(hw, trace, measured["ttft_s"]["mean"] + 0.015, 0)
    assert overhead == pytest.approx(0.015, abs=0.002)

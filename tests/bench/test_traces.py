"""Traces: reproducible from a seed, and their realised statistics match the
requested ones within sampling tolerance.

Tolerances: a sample mean is allowed 4 standard errors (computed from the
exact distribution); rates and CVs of arrivals likewise from their known
spread. The ShareGPT/BurstGPT fits are checked twice: the exact statistics of
the fitted distribution against the published numbers (how good the fit is),
and a 20,000-request sample against the exact statistics (how well sampling
reproduces it).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.cli import PROMPT_MODES
from bench.traces import (
    LENGTH_PRESETS,
    ArrivalError,
    Gamma,
    LengthDistribution,
    LengthSpecError,
    Poisson,
    PriorityMix,
    Replay,
    Trace,
    TraceConfig,
    TraceError,
    TraceRequest,
    fixed,
    generate_trace,
    llumnix_zipf,
    load_trace,
    parse_lengths,
    percentile,
    preset_lengths,
    save_trace,
    solve_zipf_alpha,
    trace_stats,
    uniform,
)
from bench.traces.fit import fit_lognormal, stats_of
from bench.traces.lengths import zipf_mean
from bench.traces.presets import LOGNORMAL_FITS, PAPER_ZIPF_ALPHAS, PUBLISHED, ZIPF_MEANS
from infra.records import Priority
from shoal.cli import main as shoal

N = 20_000


def _config(seed: int = 0, **kw: object) -> TraceConfig:
    prompt, output = preset_lengths("M-M")
    base: dict[str, object] = dict(
        num_requests=500,
        arrivals=Poisson(5.0),
        prompt_lengths=prompt,
        output_lengths=output,
        priorities=PriorityMix(high=0.1),
        seed=seed,
    )
    return TraceConfig(**{**base, **kw})  # type: ignore[arg-type]


def _sd(dist: LengthDistribution) -> float:
    mean, prev, acc = dist.mean(), 0.0, 0.0
    for i, cum in enumerate(dist.cum_weights):
        acc += (dist.lo + i - mean) ** 2 * (cum - prev)
        prev = cum
    return math.sqrt(acc / dist.cum_weights[-1])


# -- reproducibility ---------------------------------------------------------
def test_same_seed_same_file_and_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    save_trace(generate_trace(_config(7)), a)
    save_trace(generate_trace(_config(7)), b)
    save_trace(generate_trace(_config(8)), c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_text().splitlines()[1:] != c.read_text().splitlines()[1:]


def test_parts_draw_from_separate_streams() -> None:
    """Changing the priority mix leaves arrivals and lengths of a seed alone."""
    one = generate_trace(_config(3, priorities=PriorityMix(high=0.1)))
    two = generate_trace(_config(3, priorities=PriorityMix(high=0.5, low=0.2)))
    strip = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in one.requests]
    assert strip == [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in two.requests]
    assert [r.priority for r in one.requests] != [r.priority for r in two.requests]


def test_header_regenerates_the_trace() -> None:
    trace = generate_trace(_config(5, arrivals=Gamma(3.0, 4.0)))
    assert trace.header is not None
    assert generate_trace(TraceConfig.from_header(trace.header)) == trace


def test_jsonl_round_trip(tmp_path: Path) -> None:
    trace = generate_trace(_config(1, priorities=PriorityMix(high=0.2, low=0.3)))
    path = tmp_path / "t.jsonl"
    save_trace(trace, path)
    assert load_trace(path) == trace
    first = path.read_text().splitlines()[0]
    assert first.startswith('{"format":"shoal-trace","version":1,')


def test_header_less_jsonl_loads(tmp_path: Path) -> None:
    path = tmp_path / "hand.jsonl"
    path.write_text(
        '{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 2}\n\n'
        '{"arrival_s": 1.5, "prompt_tokens": 4, "output_tokens": 1, '
        '"priority": "high"}\n'
    )
    assert load_trace(path) == Trace(
        None, (TraceRequest(0.0, 3, 2), TraceRequest(1.5, 4, 1, Priority.HIGH))
    )


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"arrival_s": 0, "prompt_tokens": 0, "output_tokens": 1}',
        '{"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1, "priority": "urgent"}',
        '{"arrival_s": 0, "prompt_tokens": 1}',
        '{"format": "shoal-trace", "version": 99}',
    ],
)
def test_bad_trace_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(TraceError):
        load_trace(path)


@given(
    n=st.integers(1, 300),
    high=st.floats(0, 0.5),
    low=st.floats(0, 0.5),
    seed=st.integers(0, 2**32),
)
def test_priority_counts_are_exact(n: int, high: float, low: float, seed: int) -> None:
    got = PriorityMix(high, low).assign(random.Random(seed), n)
    assert len(got) == n
    assert got.count(Priority.HIGH) == round(high * n)
    assert got.count(Priority.LOW) == min(round(low * n), n - round(high * n))


# -- arrivals ----------------------------------------------------------------
def test_poisson_rate_and_cv() -> None:
    stats = trace_stats([TraceRequest(t, 1, 1) for t in Poisson(10.0).times(random.Random(1), N)])
    assert stats.rate is not None and stats.interarrival_cv is not None
    assert abs(stats.rate / 10.0 - 1) < 4 / math.sqrt(N)  # gap CV 1: SE of the mean gap 1/sqrt(N)
    assert abs(stats.interarrival_cv - 1.0) < 0.05


@pytest.mark.parametrize("cv", [2.0, 4.0])
def test_gamma_rate_and_cv(cv: float) -> None:
    times = Gamma(10.0, cv).times(random.Random(2), N)
    stats = trace_stats([TraceRequest(t, 1, 1) for t in times])
    assert stats.rate is not None and stats.interarrival_cv is not None
    assert abs(stats.rate / 10.0 - 1) < 4 * cv / math.sqrt(N)
    assert abs(stats.interarrival_cv / cv - 1) < 0.1


def test_replay_shifts_to_zero_and_checks_length(tmp_path: Path) -> None:
    path = tmp_path / "ts.txt"
    path.write_text("100\n100.5  # comment\n\n102\n")
    replay = Replay.from_file(path)
    assert replay.times(random.Random(0), 3) == [0.0, 0.5, 2.0]
    with pytest.raises(ArrivalError):
        replay.times(random.Random(0), 4)
    with pytest.raises(ArrivalError):
        Replay((1.0, 0.5))


# -- lengths -----------------------------------------------------------------
def test_paper_alphas_do_not_give_the_paper_means() -> None:
    """Why the presets solve for the exponent: over 1..6144 the stated
    exponents give far smaller means than 128 / 256 / 512."""
    for name, alpha in PAPER_ZIPF_ALPHAS.items():
        assert zipf_mean(alpha, 1, 6144) < 0.75 * ZIPF_MEANS[name]


@pytest.mark.parametrize("name", ["S", "M", "L"])
def test_zipf_sets_hit_their_means(name: str) -> None:
    dist = parse_lengths(name)
    target = ZIPF_MEANS[name]
    assert dist.lo == 1 and dist.hi == 6144
    assert dist.mean() == pytest.approx(target, rel=1e-3)
    values = dist.sample(random.Random(4), N)
    assert abs(sum(values) / N - dist.mean()) < 4 * _sd(dist) / math.sqrt(N)
    assert min(values) >= 1 and max(values) <= 6144


@pytest.mark.parametrize("pair", ["S-S", "M-M", "L-L", "S-L", "L-S"])
def test_pair_presets(pair: str) -> None:
    prompt, output = preset_lengths(pair)
    p, o = pair.split("-")
    assert prompt.mean() == pytest.approx(ZIPF_MEANS[p], rel=1e-3)
    assert output.mean() == pytest.approx(ZIPF_MEANS[o], rel=1e-3)


def test_solve_zipf_alpha_is_monotone_and_exact() -> None:
    alphas = [solve_zipf_alpha(m) for m in (128, 256, 512)]
    assert alphas == sorted(alphas, reverse=True)
    assert zipf_mean(solve_zipf_alpha(100, 10, 1000), 10, 1000) == pytest.approx(100, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("sharegpt-prompt", (0.05, 0.03, 0.05)),
        ("sharegpt-output", (0.04, 0.03, 0.01)),
        ("burstgpt-prompt", (0.001, None, 0.001)),
        ("burstgpt-output", (0.001, None, 0.001)),
    ],
)
def test_fitted_presets_match_published_statistics(
    name: str, tolerance: tuple[float, float | None, float]
) -> None:
    """Exact statistics of the fit vs the published ones: ShareGPT within
    5 % (mean), 3 % (P50), 5 % (P99); BurstGPT (two targets) exact."""
    got, want = stats_of(parse_lengths(name)), PUBLISHED[name]
    tol_mean, tol_p50, tol_p99 = tolerance
    assert got.mean == pytest.approx(want.mean, rel=tol_mean)
    assert got.p99 == pytest.approx(want.p99, rel=tol_p99)
    if tol_p50 is not None:
        assert got.p50 == pytest.approx(want.p50, rel=tol_p50)


@pytest.mark.parametrize("name", list(LOGNORMAL_FITS))
def test_fitted_presets_sample_to_their_statistics(name: str) -> None:
    """20,000 draws: mean within 4 standard errors, P50 within 3 %, P99
    within 8 % of the exact values; and within 10 % of the published ones."""
    dist = parse_lengths(name)
    values = dist.sample(random.Random(5), N)
    mean = sum(values) / N
    assert abs(mean - dist.mean()) < 4 * _sd(dist) / math.sqrt(N)
    assert percentile(values, 0.5) == pytest.approx(dist.quantile(0.5), rel=0.03)
    assert percentile(values, 0.99) == pytest.approx(dist.quantile(0.99), rel=0.08)
    published = PUBLISHED[name]
    assert mean == pytest.approx(published.mean, rel=0.1)
    assert percentile(values, 0.99) == pytest.approx(published.p99, rel=0.1)


def test_fit_reproduces_the_preset_parameters() -> None:
    for name in ("sharegpt-output", "burstgpt-output"):
        assert fit_lognormal(PUBLISHED[name]) == LOGNORMAL_FITS[name]


def test_llumnix_zipf_reproduces_the_paper_method() -> None:
    for name, alpha in PAPER_ZIPF_ALPHAS.items():
        dist = llumnix_zipf(ZIPF_MEANS[name], alpha)
        assert dist.mean() == pytest.approx(ZIPF_MEANS[name], rel=0.02)
        assert dist.hi <= 6144


@pytest.mark.parametrize(
    "spec",
    [
        "fixed:128",
        "uniform:lo=3,hi=90",
        "zipf:mean=64,hi=2048",
        "zipf:alpha=1.5,lo=2,hi=50",
        "lognormal:mu=4.0,sigma=0.7,hi=500",
        "llumnix-zipf:mean=128,alpha=2.0",
        "M",
        "sharegpt-output",
    ],
)
def test_specs_round_trip(spec: str) -> None:
    dist = parse_lengths(spec)
    assert parse_lengths(dist.spec) == dist


@pytest.mark.parametrize(
    "spec",
    [
        "zipf",
        "zipf:mean=1",
        "fixed:0",
        "fixed:2.5",
        "uniform:lo=5",
        "uniform:lo=5,hi=2",
        "lognormal:mu=1,sigma=0",
        "zipf:mean=100,hello=3",
        "fixed:n=x",
        "nope:1",
    ],
)
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(LengthSpecError):
        parse_lengths(spec)


def test_uniform_and_fixed_statistics() -> None:
    dist = uniform(10, 20)
    values = dist.sample(random.Random(6), N)
    assert set(values) == set(range(10, 21))
    assert dist.mean() == 15.0 and abs(sum(values) / N - 15.0) < 0.1
    assert fixed(7).sample(random.Random(0), 3) == [7, 7, 7]


def test_max_total_tokens_is_respected() -> None:
    trace = generate_trace(_config(9, num_requests=2000, max_total_tokens=1024))
    assert all(r.prompt_tokens + r.output_tokens <= 1024 for r in trace.requests)
    with pytest.raises(TraceError):
        generate_trace(
            _config(0, prompt_lengths=fixed(600), output_lengths=fixed(600), max_total_tokens=1000)
        )


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([5], 0.99) == 5
    assert math.isnan(percentile([], 0.5))


# -- the command line --------------------------------------------------------
def test_cli_writes_a_trace_and_prints_its_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trace.jsonl"
    args = [
        "bench",
        "trace",
        "--arrivals",
        "gamma",
        "--rate",
        "5",
        "--cv",
        "2",
        "--lengths",
        "S-L",
        "--num-requests",
        "400",
        "--high-fraction",
        "0.1",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    assert shoal(args) == 0
    printed = capsys.readouterr().out
    assert "inter-arrival CV" in printed and "high priority (%)" in printed
    trace = load_trace(out)
    assert trace.header is not None and trace.header.lengths_preset == "S-L"
    assert sum(r.priority == Priority.HIGH for r in trace.requests) == 40
    assert shoal([*args[:-1], str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()


def test_cli_reports_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert shoal(["bench", "trace", "--arrivals", "gamma", "--rate", "5"]) == 1
    assert "cv" in capsys.readouterr().err
    assert shoal(["bench", "trace", "--rate", "5", "--prompt-lengths", "zipf:mean=0"]) == 1


def test_cli_knows_every_preset_and_prompt_mode() -> None:
    from bench.loadgen import PROMPT_MODES as LOADGEN_MODES

    assert PROMPT_MODES == LOADGEN_MODES
    assert {"S-S", "M-M", "L-L", "S-L", "L-S", "sharegpt", "burstgpt"} <= set(LENGTH_PRESETS)

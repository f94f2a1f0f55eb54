"""Real production traces: shipped with their attribution, read exactly, and
converted (window, speedup, rate scale, lengths, priorities) reproducibly."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bench.traces import (
    SOURCES,
    ConvertOptions,
    PriorityMix,
    RawRequest,
    TraceError,
    convert,
    load_trace,
    read_source,
    save_trace,
)
from bench.traces.real import parse_azure, parse_mooncake
from infra.records import Priority
from shoal.cli import main as shoal

DATA = Path(__file__).resolve().parents[2] / "bench" / "traces" / "data"
SIZES = {"azure-conv": 19366, "azure-code": 8819, "mooncake-conversation": 12031}
"""Request counts of the published files."""


def _steady(n: int, gap_s: float, prompt: int = 100, output: int = 10) -> list[RawRequest]:
    return [RawRequest(i * gap_s, prompt, output) for i in range(n)]


# -- the shipped files -------------------------------------------------------
@pytest.mark.parametrize("name", list(SOURCES))
def test_each_shipped_trace_reads_whole_and_in_order(name: str) -> None:
    raw = read_source(name)
    assert len(raw) == SIZES[name]
    times = [r.arrival_s for r in raw]
    assert times[0] == 0 and times == sorted(times)
    assert 3000 < times[-1] < 3700  # about one hour each
    assert min(min(r.prompt_tokens, r.output_tokens) for r in raw) >= 1


def test_the_notice_attributes_every_shipped_file() -> None:
    notice = (DATA / "NOTICE").read_text()
    for source in SOURCES.values():
        assert source.file in notice
    assert "CC BY 4.0" in notice and "Apache License 2.0" in notice
    assert "Patel et al." in notice and "Qin et al." in notice
    assert "Apache License" in (DATA / "LICENSE-mooncake-APACHE").read_text()
    shipped = {p.name for p in DATA.iterdir()}
    assert shipped == {s.file for s in SOURCES.values()} | {"NOTICE", "LICENSE-mooncake-APACHE"}


def test_azure_timestamps_keep_seven_digits_and_cross_midnight_and_months() -> None:
    rows = [
        "TIMESTAMP,ContextTokens,GeneratedTokens",
        "2023-11-30 23:59:59.9999999,10,2",
        "2023-12-01 00:00:00.5000000,20,3",
        "2023-11-30 23:59:59.0000001,0,1",
    ]
    raw = parse_azure(rows)
    assert [r.prompt_tokens for r in raw] == [1, 10, 20]  # by arrival; 0 tokens count as 1
    assert raw[1].arrival_s == pytest.approx(0.9999998)
    assert raw[2].arrival_s == pytest.approx(1.4999999)


def test_bad_source_lines_name_their_line() -> None:
    with pytest.raises(TraceError, match="line 3"):
        parse_azure(["TIMESTAMP,ContextTokens,GeneratedTokens", "2023-11-16 18:00:00.0,1,1",
                     "2023-11-16 18:00:01.0,x,1"])  # fmt: skip
    with pytest.raises(TraceError, match="line 2"):
        parse_mooncake(['{"timestamp": 0, "input_length": 5, "output_length": 1}', "{}"])
    with pytest.raises(TraceError, match="unknown trace source"):
        read_source("sharegpt")


# -- conversion --------------------------------------------------------------
def test_window_and_speedup_keep_the_arrival_pattern() -> None:
    raw = _steady(100, 1.0)  # one request a second for 100 s
    trace = convert("test", ConvertOptions(start_s=20, duration_s=50, speedup=10), raw)
    times = [r.arrival_s for r in trace.requests]
    assert len(times) == 50
    assert times[0] == 0 and times[-1] == pytest.approx(4.9)
    assert trace.header is not None and trace.header.arrivals["rate_scale"] == 1.0


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_rate_scale_thins_or_replicates_to_the_asked_rate(scale: float) -> None:
    raw = _steady(4000, 0.5)
    trace = convert("test", ConvertOptions(rate_scale=scale, seed=4), raw)
    # Binomial spread of the fractional part: 4 standard deviations.
    frac = scale - int(scale)
    assert abs(len(trace.requests) - scale * 4000) <= 4 * (4000 * frac * (1 - frac)) ** 0.5 + 1
    times = [r.arrival_s for r in trace.requests]
    assert times == sorted(times) and times[-1] <= 2000


def test_target_rate_sets_the_mean_rate_after_the_speedup() -> None:
    raw = _steady(6000, 0.6)  # 1.67 req/s over an hour
    opts = ConvertOptions(duration_s=3000, speedup=5, target_rate=4.0, seed=1)
    trace = convert("test", opts, raw)
    rate = len(trace.requests) / (3000 / 5)
    assert rate == pytest.approx(4.0, rel=0.05)


def test_lengths_are_scaled_then_capped_keeping_the_output() -> None:
    opts = ConvertOptions(length_scale=0.5, max_prompt_tokens=300, max_output_tokens=50,
                          max_total_tokens=200)  # fmt: skip
    raw = [RawRequest(0, 1000, 400), RawRequest(1, 100, 40), RawRequest(2, 1, 1)]
    lengths = [(r.prompt_tokens, r.output_tokens) for r in convert("t", opts, raw).requests]
    assert lengths == [(150, 50), (50, 20), (1, 1)]


def test_priorities_are_exact_fractions_and_leave_the_rest_unchanged() -> None:
    raw = read_source("azure-code")
    plain = convert("azure-code", ConvertOptions(duration_s=600), raw)
    mix = PriorityMix(0.1, 0.2)
    mixed = convert("azure-code", ConvertOptions(duration_s=600, priorities=mix), raw)
    n = len(mixed.requests)
    assert sum(r.priority == Priority.HIGH for r in mixed.requests) == round(0.1 * n)
    assert sum(r.priority == Priority.LOW for r in mixed.requests) == round(0.2 * n)
    strip = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in mixed.requests]
    assert strip == [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in plain.requests]


def test_the_same_options_give_the_same_trace_and_the_seed_matters() -> None:
    raw = read_source("azure-conv")
    opts = ConvertOptions(duration_s=900, speedup=3, target_rate=12, seed=7,
                          priorities=PriorityMix(high=0.1))  # fmt: skip
    assert convert("azure-conv", opts, raw) == convert("azure-conv", opts, raw)
    other = ConvertOptions(duration_s=900, speedup=3, target_rate=12, seed=8,
                           priorities=PriorityMix(high=0.1))  # fmt: skip
    assert convert("azure-conv", other, raw).requests != convert("azure-conv", opts, raw).requests


def test_a_converted_trace_round_trips_with_its_source(tmp_path: Path) -> None:
    opts = ConvertOptions(duration_s=120, length_scale=0.1, max_total_tokens=512)
    trace = convert("mooncake-conversation", opts)
    save_trace(trace, tmp_path / "t.jsonl")
    loaded = load_trace(tmp_path / "t.jsonl")
    assert loaded == trace
    assert loaded.header is not None and loaded.header.source is not None
    assert loaded.header.source["name"] == "mooncake-conversation"
    assert "Apache-2.0" in loaded.header.source["attribution"]
    assert max(r.prompt_tokens + r.output_tokens for r in loaded.requests) <= 512


@pytest.mark.parametrize(
    "opts",
    [
        {"rate_scale": 2.0, "target_rate": 3.0},
        {"speedup": 0.0},
        {"duration_s": -1.0},
        {"max_total_tokens": 1},
        {"rate_scale": -1.0},
    ],
)
def test_bad_options_are_refused(opts: dict[str, float]) -> None:
    with pytest.raises(TraceError):
        ConvertOptions(**opts)  # type: ignore[arg-type]


def test_an_empty_window_is_an_error() -> None:
    with pytest.raises(TraceError, match="no requests in the window"):
        convert("t", ConvertOptions(start_s=500), _steady(10, 1.0))


# -- the command line --------------------------------------------------------
def test_cli_converts_a_shipped_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "conv.jsonl"
    args = ["bench", "trace", "--from", "azure-conv", "--duration", "600", "--speedup", "10",
            "--target-rate", "8", "--length-scale", "0.5", "--max-total-tokens", "2048",
            "--high-fraction", "0.1", "--seed", "2", "--out", str(out)]  # fmt: skip
    assert shoal(args) == 0
    printed = capsys.readouterr().out
    assert "Patel et al." in printed and "arrival rate" in printed
    trace = load_trace(out)
    assert len(trace.requests) == pytest.approx(8 * 60, rel=0.1)
    assert statistics.fmean(r.arrival_s for r in trace.requests) < 60
    num_high = sum(r.priority == Priority.HIGH for r in trace.requests)
    assert num_high == round(0.1 * len(trace.requests))


def test_cli_reports_bad_conversions(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "trace", "--from", "azure-code", "--rate-scale", "2", "--target-rate", "3"]
    assert shoal(args) == 1
    assert "not both" in capsys.readouterr().err

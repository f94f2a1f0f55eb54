"""The traffic log: windowed rates and per-priority P99s, bounded."""

from __future__ import annotations

import json

import pytest

from infra.records import Priority
from infra.traffic import TrafficBatch, TrafficLog, p99


def test_rates_cover_the_rate_window_only() -> None:
    log = TrafficLog(window_s=30, rate_window_s=5)
    for k in range(100):
        log.arrived(k * 0.1)  # 10 req/s for 10 s
        log.served(k * 0.1, tokens=10)
    s = log.summary(10.0)
    assert s.arrival_rate == pytest.approx(10.0, rel=0.05)
    assert s.token_rate == pytest.approx(100.0, rel=0.05)
    assert log.summary(20.0).arrival_rate == 0.0


def test_a_young_log_undercounts_rather_than_spikes() -> None:
    log = TrafficLog(rate_window_s=5)
    log.arrived(0.0)
    assert log.summary(0.0).arrival_rate == pytest.approx(0.2)


def test_latency_is_per_priority_over_the_window() -> None:
    log = TrafficLog(window_s=30)
    for k in range(100):
        log.first_token(float(k) * 0.1, Priority.HIGH, 0.1 + (1.0 if k == 99 else 0.0))
        log.first_token(float(k) * 0.1, Priority.NORMAL, 2.0)
    log.finished(5.0, Priority.NORMAL, 0.05)
    s = log.summary(10.0)
    assert s.of(Priority.HIGH).num_first_tokens == 100
    assert s.of(Priority.HIGH).ttft_p99_s == pytest.approx(0.1)  # one outlier in 100
    assert s.of(Priority.NORMAL).ttft_p99_s == 2.0
    assert s.of(Priority.NORMAL).tpot_p99_s == 0.05
    assert s.of(Priority.LOW).ttft_p99_s is None
    assert log.summary(100.0).of(Priority.HIGH).num_first_tokens == 0


def test_the_log_is_bounded_and_says_so() -> None:
    log = TrafficLog(window_s=30, rate_window_s=5, max_samples=10)
    for k in range(50):
        log.arrived(k * 0.01)
    s = log.summary(1.0)
    assert s.truncated and s.arrival_rate == pytest.approx(10 / 5)


def test_p99_is_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([3.0]) == 3.0
    assert p99([float(v) for v in range(1, 101)]) == 99.0


def test_a_batch_round_trips_and_merges_as_its_parts() -> None:
    batch = TrafficBatch(arrivals=3, tokens=300, ttft={Priority.HIGH: [0.2, 0.4]},
                         tpot={Priority.LOW: [0.05]})  # fmt: skip
    again = TrafficBatch.from_json(json.loads(json.dumps(batch.to_json())))
    assert again == batch and not again.empty and TrafficBatch().empty
    log = TrafficLog(rate_window_s=5)
    log.add(1.0, batch)
    s = log.summary(2.0)
    assert s.arrival_rate == pytest.approx(3 / 5) and s.token_rate == pytest.approx(60)
    assert s.of(Priority.HIGH).ttft_p99_s == 0.4 and s.of(Priority.LOW).tpot_p99_s == 0.05

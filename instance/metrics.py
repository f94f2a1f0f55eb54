"""Prometheus metrics of an instance worker (``shoal_instance_*``)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infra.records import LoadReport
from migration.metrics import MigrationMetrics
from migration.ports import KvStatus

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class InstanceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "shoal_instance_"
        self.requests = Counter(
            p + "requests", "Requests finished, by priority and finish reason",
            ["priority", "finish_reason"], registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time from arrival to first token",
            ["priority"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            p + "time_per_output_token_seconds", "Time between output tokens",
            ["priority"], buckets=_TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            p + "request_duration_seconds", "Time from arrival to the last token",
            ["priority"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.unmigratable = Counter(
            p + "unmigratable_requests", "Requests a gateway sent that live migration "
            "may not move (a drain waits for them), by what pins them", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.unauthenticated = Counter(
            p + "unauthenticated_calls", "Calls refused for want of the cluster credential, "
            "by the first segment of their path", ["path"], registry=registry,
        )  # fmt: skip
        self.direct = Counter(
            p + "direct_requests", "Requests served without the cluster credential "
            "(SHOAL_ALLOW_DIRECT_REQUESTS, for debugging; at most normal priority), by path",
            ["path"], registry=registry,
        )  # fmt: skip
        self.kv_refusals = Counter(
            p + "kv_port_refusals", "Calls the KV port refused: without the cluster's KV "
            "credential (unauthenticated) or reads without their migration's grant "
            "(not_granted)", ["reason"], registry=registry,
        )  # fmt: skip
        self._kv_refused: dict[str, int] = {}
        self.running = Gauge(p + "running_requests", "Requests running", registry=registry)
        self.waiting = Gauge(p + "waiting_requests", "Requests waiting", registry=registry)
        self.blocks_used = Gauge(p + "kv_blocks_used", "KV blocks in use", registry=registry)
        self.blocks_total = Gauge(p + "kv_blocks_total", "KV capacity", registry=registry)
        self.kv_usage = Gauge(p + "kv_usage_ratio", "KV blocks used / total", registry=registry)
        self.freeness = Gauge(p + "freeness", "Llumnix freeness (inf when idle)", registry=registry)
        self.tokens_per_s = Gauge(
            p + "generation_tokens_per_second", "Output tokens/s (1 s window)", registry=registry
        )
        self.preemptions = Counter(p + "preemptions", "Requests preempted", registry=registry)
        self.reports = Counter(p + "load_reports", "LoadReports published", registry=registry)
        self.report_errors = Counter(
            p + "load_report_errors", "LoadReports that failed to publish", registry=registry
        )
        self.migration = MigrationMetrics(registry)
        self._last_preempted = 0

    def observe_kv(self, status: KvStatus) -> None:
        """Bring the KV port refusal counters up to the port's own totals."""
        for reason, total in (("unauthenticated", status.unauthenticated),
                              ("not_granted", status.not_granted)):  # fmt: skip
            delta = total - self._kv_refused.get(reason, 0)
            if delta > 0:
                self.kv_refusals.labels(reason).inc(delta)
            self._kv_refused[reason] = total

    def observe_load(self, report: LoadReport) -> None:
        self.running.set(report.num_running)
        self.waiting.set(report.num_waiting)
        self.blocks_used.set(report.num_blocks_used)
        self.blocks_total.set(report.num_blocks_total)
        total = report.num_blocks_total
        self.kv_usage.set(report.num_blocks_used / total if total else 0.0)
        self.freeness.set(report.freeness if not math.isnan(report.freeness) else 0.0)
        self.tokens_per_s.set(report.generation_tokens_per_s)
        delta = report.num_preempted_total - self._last_preempted
        if delta > 0:
            self.preemptions.inc(delta)
        self._last_preempted = report.num_preempted_total

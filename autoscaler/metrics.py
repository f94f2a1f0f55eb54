"""Prometheus metrics of the autoscaler (``shoal_autoscaler_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "shoal_autoscaler_"
        self.leader = Gauge(p + "leader", "1 while this autoscaler holds the lease",
                            registry=registry)  # fmt: skip
        self.instances = Gauge(p + "instances", "Instances by state", ["state"],
                               registry=registry)  # fmt: skip
        self.decisions = Counter(p + "decisions", "Decisions executed, by kind", ["kind"],
                                 registry=registry)  # fmt: skip
        self.migrations = Counter(p + "migrations", "Requests moved by the autoscaler, by outcome",
                                  ["outcome"], registry=registry)  # fmt: skip
        self.instance_seconds = Counter(
            p + "instance_seconds", "Instance-seconds consumed (GPU-seconds on GPU hosts)",
            registry=registry,
        )  # fmt: skip
        self.held = Gauge(p + "held_requests", "Requests gateways hold for lack of an instance",
                          registry=registry)  # fmt: skip
        self.cold_start = Histogram(
            p + "cold_start_seconds", "From launching an instance to its first active report",
            buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600), registry=registry,
        )  # fmt: skip

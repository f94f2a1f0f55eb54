"""Prometheus metrics of migrations, in and out of an instance
(``shoal_instance_migration*``, registered with the instance's own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from migration.protocol import ArrivalRecord

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MigrationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "shoal_instance_"
        self.migrations = Counter(
            p + "migrations", "Migrations out of this instance, by mode and outcome",
            ["mode", "outcome"], registry=registry,
        )  # fmt: skip
        self.downtime = Histogram(
            p + "migration_downtime_seconds",
            "Migrated-in requests: from the freeze on their source to their first token here",
            ["mode"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.downtime_parts = Histogram(
            p + "migration_downtime_part_seconds",
            "Migrated-in requests by KV: the downtime's parts here (final_copy, admit, "
            "load, first_step; first_step includes load)",
            ["part"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.unclaimed = Counter(
            p + "migrations_unclaimed",
            "Migrated-in requests aborted because no client resumed them in time",
            registry=registry,
        )  # fmt: skip
        self.resume_refused = Counter(
            p + "resumes_refused",
            "Resumes of a migrated-in request refused, by why: no such request "
            "waits (unknown) or the resume token is not its owner's (token)",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.bytes = Counter(
            p + "migration_bytes", "KV bytes copied out by migrations", registry=registry
        )
        self.reserved_blocks = Gauge(
            p + "migration_reserved_blocks", "Blocks reserved for incoming migrations",
            registry=registry,
        )  # fmt: skip

    def arrived(self, arrival: ArrivalRecord) -> None:
        """Observe the parts of a migrated-in request's downtime."""
        if arrival.mode != "kv":
            return
        parts = {"final_copy": arrival.final_copy_s, "admit": arrival.admit_s,
                 "load": arrival.load_s, "first_step": arrival.first_step_s}  # fmt: skip
        for part, seconds in parts.items():
            if seconds is not None:
                self.downtime_parts.labels(part).observe(seconds)

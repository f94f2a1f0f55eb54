"""Prometheus metrics of a gateway replica (``shoal_gateway_*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_REDIS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = "shoal_gateway_"
        self.requests = Counter(p + "requests", "Requests answered, by status and priority",
                                ["status", "priority"], registry=registry)  # fmt: skip
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token",
                              ["priority"], buckets=_LATENCY, registry=registry)  # fmt: skip
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Time per output token",
                              ["priority"], buckets=_PER_TOKEN, registry=registry)  # fmt: skip
        self.e2e = Histogram(p + "request_duration_seconds", "End-to-end request latency",
                             ["priority"], buckets=_LATENCY, registry=registry)  # fmt: skip
        self.inflight = Gauge(p + "inflight_requests", "Requests in flight", registry=registry)
        self.dispatched = Counter(p + "dispatch_decisions", "Requests sent, by instance",
                                  ["instance"], registry=registry)  # fmt: skip
        self.retries = Counter(p + "retries", "Attempts retried on another instance",
                               registry=registry)  # fmt: skip
        self.replays = Counter(
            p + "replays", "Streams broken after their first token and continued on another "
            "instance from the tokens already sent", registry=registry,
        )  # fmt: skip
        self.migrations_followed = Counter(
            p + "migrations_followed", "Streams resumed on another instance after a migration",
            registry=registry,
        )  # fmt: skip
        self.instances = Gauge(p + "view_instances", "Instances in the gateway's view",
                               registry=registry)  # fmt: skip
        self.held = Gauge(p + "held_requests", "Requests waiting for an instance (scale from zero)",
                          registry=registry)  # fmt: skip
        self.hold_timeouts = Counter(p + "hold_timeouts", "Held requests answered 503",
                                     registry=registry)  # fmt: skip
        self.redis_call = Histogram(
            p + "redis_call_seconds",
            "Round trip of the gateway's Redis calls: a reservation (cut at the reservation "
            "timeout) or a cluster-view refresh",
            ["call"], buckets=_REDIS, registry=registry,
        )  # fmt: skip
        self.view_age = Gauge(p + "view_age_seconds",
                              "Seconds since the cluster view was last refreshed from Redis",
                              registry=registry)  # fmt: skip
        self.reservations_skipped = Counter(
            p + "reservations_skipped", "Dispatches without a reservation (Redis slow or down)",
            registry=registry,
        )  # fmt: skip

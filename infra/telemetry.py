"""Tracing and metrics setup. No process-wide state is created here that the
caller does not hold: each component gets its own tracer and registry."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


def make_tracer(service_name: str, otlp_endpoint: str | None) -> trace.Tracer:
    """An OTLP/HTTP-exporting tracer when an endpoint is configured, else a
    no-op tracer (spans cost nothing)."""
    if not otlp_endpoint:
        return trace.NoOpTracer()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing to %s as %s", otlp_endpoint, service_name)
    return provider.get_tracer(service_name)


def extract_context(headers: Mapping[str, str]) -> Context:
    """The W3C trace context carried by incoming headers (``traceparent``)."""
    return _PROPAGATOR.extract(carrier=dict(headers))


def inject_context(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add the ``traceparent`` of ``context`` (default: the current span) to
    outgoing headers."""
    _PROPAGATOR.inject(headers, context=context)
    return headers


def new_registry() -> CollectorRegistry:
    """A fresh Prometheus registry for one component (no global default)."""
    return CollectorRegistry(auto_describe=True)

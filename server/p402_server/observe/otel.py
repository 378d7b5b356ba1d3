"""Optional OpenTelemetry export: one span per Authorize and per Record, and the same
decision and latency metrics as /metrics, sent over OTLP. Off unless configured.

Turned on by `p402 serve --otel-endpoint URL` (or OTEL_EXPORTER_OTLP_ENDPOINT):
spans and metrics go to that OTLP/HTTP collector (`pip install -e '.[otel]'`;
service.name "p402"). Tests pass their own span exporter and metric reader.

Attribute names follow the OpenTelemetry GenAI semantic conventions where one exists
(gen_ai.request.model, gen_ai.provider.name, gen_ai.request.max_tokens,
gen_ai.usage.input_tokens, gen_ai.usage.output_tokens), and p402.* otherwise
(tenant, decision, reasons, reservation and event ids, money as integer nano-USD
strings: an attribute number is a double, and money never goes through a float).
Never content, never keys.
"""
from __future__ import annotations

import time
from typing import Any

from p402_server.observe.metrics import decision_name, outcome_name


def _nanos(m) -> str:
    return str(m.units * 1_000_000_000 + m.nanos)


class Otel:
    """Spans and metrics of the meter service (module docstring)."""

    def __init__(self, *, endpoint: str = "", span_exporter=None, metric_reader=None):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource.create({"service.name": "p402"})
        readers = []
        if span_exporter is None and endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            base = endpoint.rstrip("/")
            span_exporter = OTLPSpanExporter(endpoint=base + "/v1/traces")
            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=base + "/v1/metrics")))
        if metric_reader is not None:
            readers.append(metric_reader)
        self.tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            processor = (BatchSpanProcessor(span_exporter) if endpoint
                         else SimpleSpanProcessor(span_exporter))
            self.tracer_provider.add_span_processor(processor)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer = self.tracer_provider.get_tracer("p402")
        meter = self.meter_provider.get_meter("p402")
        self.decisions = meter.create_counter(
            "p402.decisions", unit="{decision}", description="Authorize answers")
        self.duration = meter.create_histogram(
            "p402.rpc.duration", unit="s", description="Server-side RPC latency")

    def _span(self, name: str, started: float, attrs: dict) -> None:
        # started: time.perf_counter() at the handler's start -> the span's start time
        now_ns = time.time_ns()
        start_ns = now_ns - int((time.perf_counter() - started) * 1e9)
        span = self.tracer.start_span(name, start_time=start_ns,
                                      attributes={k: v for k, v in attrs.items()
                                                  if v not in (None, "")})
        span.end(end_time=now_ns)

    def authorized(self, tenant: str, req: Any, resp: Any, started: float,
                   rpc: bool = True) -> None:
        """A decision's span and count; `rpc`: it was a unary Authorize, whose duration
        is recorded (a decision on a stream is not an RPC of its own)."""
        decision = decision_name(resp.decision)
        self._span("p402.authorize", started, {
            "p402.tenant.id": tenant, "gen_ai.request.model": req.model,
            "gen_ai.provider.name": resp.provider or req.provider,
            "gen_ai.request.max_tokens": int(resp.output_token_cap) or None,
            "p402.decision": decision, "p402.reasons": ",".join(resp.reasons),
            "p402.reservation.id": resp.reservation_id,
            "p402.estimated_cost_nanos": _nanos(resp.estimated_cost)})
        self.decisions.add(1, {"decision": decision,
                               "reason": resp.reasons[0] if resp.reasons else "none"})
        if rpc:
            self.duration.record(time.perf_counter() - started, {"method": "Authorize"})

    def recorded(self, tenant: str, req: Any, resp: Any, started: float) -> None:
        u = req.usage
        self._span("p402.record", started, {
            "p402.tenant.id": tenant, "gen_ai.request.model": req.model,
            "gen_ai.provider.name": req.provider,
            "gen_ai.usage.input_tokens": int(u.input_tokens),
            "gen_ai.usage.output_tokens": int(u.output_tokens),
            "p402.outcome": outcome_name(req.outcome),
            "p402.reservation.id": req.reservation_id, "p402.event.id": resp.event_id,
            "p402.cost_nanos": _nanos(resp.cost)})
        self.duration.record(time.perf_counter() - started, {"method": "Record"})

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


__all__ = ["Otel"]

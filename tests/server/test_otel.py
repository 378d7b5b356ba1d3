"""OpenTelemetry export: one span per Authorize and per Record with the GenAI
semantic-convention attributes, and the decision and latency metrics, captured with
the SDK's in-memory exporter and reader (no collector needed); off by default."""
from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed")

from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from p402.v1 import common_pb2, meter_pb2  # noqa: E402

from p402_server.observe.otel import Otel  # noqa: E402
from tests.server.service_harness import nanos, owners  # noqa: E402


@pytest.fixture
async def traced(tmp_path):
    import grpc

    from p402_server.runtime.config import ServerConfig
    from p402_server.server import create_server, init_tenant
    from p402_server.ledger import open_store
    from tests.server.service_harness import FAST, Service

    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    otel = Otel(span_exporter=spans, metric_reader=reader)
    url = f"sqlite+aiosqlite:///{tmp_path}/p402.db"
    store = await open_store(url)
    tenant_id, api_key = await init_tenant(store, "acme")
    cfg = ServerConfig(**FAST)
    server, port = create_server("127.0.0.1:0", store=store, config=cfg, otel=otel)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    svc = Service(url, store, server, port, channel, tenant_id, api_key, cfg)
    try:
        yield svc, spans, reader
    finally:
        await svc.close()
        otel.shutdown()


async def test_a_span_per_authorize_and_record_with_genai_attributes(traced):
    svc, spans, reader = traced
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model="gpt-4o-mini", owners=owners(customer="acme"), input_bytes=400,
        max_output_tokens=64), metadata=svc.auth)
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=a.reservation_id, model="gpt-4o-mini",
        usage=common_pb2.Usage(input_tokens=100, output_tokens=20)), metadata=svc.auth)
    by = {s.name: s for s in spans.get_finished_spans()}
    auth, rec = by["p402.authorize"], by["p402.record"]
    assert auth.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert auth.attributes["gen_ai.request.max_tokens"] == 64
    assert auth.attributes["p402.decision"] == "ALLOW"
    assert auth.attributes["p402.reservation.id"] == a.reservation_id
    assert auth.attributes["p402.tenant.id"] == svc.tenant_id
    assert rec.attributes["gen_ai.usage.input_tokens"] == 100
    assert rec.attributes["gen_ai.usage.output_tokens"] == 20
    assert rec.attributes["p402.cost_nanos"] == str(nanos(r.cost))  # never a float
    assert rec.attributes["p402.event.id"] == r.event_id
    assert auth.start_time <= auth.end_time and rec.start_time <= rec.end_time
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    assert {"p402.decisions", "p402.rpc.duration"} <= names


def test_off_unless_configured(monkeypatch):
    from p402_server.server import _otel

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert _otel("") is None

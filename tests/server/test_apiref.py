"""The API reference generated from the protos' comments: every field of the core
contract (Authorize, Record, Usage, Owners, budgets) is documented, with its unit and
default where it has them, and the page renders every service, message and enum."""
from __future__ import annotations

import os

import pytest

from p402_server.api import apiref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE = ("Owners", "Usage", "BudgetStatus", "AuthorizeRequest", "AuthorizeResponse",
        "RecordRequest", "RecordResponse", "GetReceiptRequest", "ReleaseRequest",
        "ReleaseResponse")


@pytest.fixture(scope="module")
def data():
    pytest.importorskip("grpc_tools", reason="grpcio-tools builds the reference")
    return apiref.descriptor_set(os.path.join(ROOT, "proto"))


def test_every_core_field_is_documented(data):
    comments = apiref.field_comments(data)
    core = {k: v for k, v in comments.items() if k.split(".")[0] in CORE}
    assert len(core) > 80
    undocumented = sorted(k for k, v in core.items() if not v)
    assert undocumented == []


@pytest.mark.parametrize("field,words", [
    ("AuthorizeRequest.input_bytes", ("bytes", "unknown")),
    ("AuthorizeRequest.max_output_tokens", ("0 =",)),
    ("AuthorizeRequest.reservation_id", ("idempotent",)),
    ("AuthorizeRequest.request_id", ("idempotency", "Default")),
    ("RecordRequest.event_id", ("Idempotency",)),
    ("AuthorizeRequest.content", ("never stored",)),
    ("AuthorizeResponse.estimated_cost", ("units + nanos",)),
    ("RecordResponse.cost", ("units + nanos",)),
    ("Usage.audio_ms", ("Milliseconds",)),
])
def test_units_and_defaults_are_stated(data, field, words):
    text = apiref.field_comments(data)[field]
    for w in words:
        assert w in text, (field, w, text)


def test_the_page_names_every_rpc_and_message(data):
    page = apiref.render(data)
    for name in ("service MeterService", "`Authorize(AuthorizeRequest) returns (AuthorizeResponse)`",
                 "`StreamRecords(stream RecordRequest) returns (stream RecordResponse)`",
                 "service AdminService", "message Usage", "enum Decision", "`DECISION_DENY` = 3",
                 "| `expected_usage` | 14 | `Usage` |"):
        assert name in page, name


def test_the_module_writes_the_reference_from_the_source_tree(tmp_path):
    """`python -m p402_server.api.apiref FILE` finds proto/ wherever the module sits in
    the checkout and writes the same page the build does."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools builds the reference")
    out = tmp_path / "API.md"
    assert apiref.main([str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# P402 wire contract (p402.v1): API reference")
    assert "MeterService" in text and "AdminService" in text

"""Billing exports (`p402 billing export`): Stripe meter events that keep Stripe's
field rules, OpenMeter events that the CloudEvents SDK reads back as valid CloudEvents
1.0, Lago events; one per event that cost or sold something, keyed by the event id so
a re-export is identical (the billing system deduplicates)."""
from __future__ import annotations

import datetime as dt
import json
import re

import pytest

import p402_client as pc
from p402_server.cli import main

NOV = int(dt.datetime(2026, 11, 3, 9, tzinfo=dt.timezone.utc).timestamp() * 1000)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def recorded(tenant, server):
    with pc.P402Client(server.target, api_key=tenant[1]) as p402:
        p402.put_price_book({"markup_pct": "25"})
        results = [p402.record(model="gpt-4o-mini", owners={"customer": c, "feature": "chat"},
                               input_tokens=40_000, output_tokens=900, event_time_ms=NOV + i)
                   for i, c in enumerate(("acme", "acme", "globex"))]
        denied = p402.authorize("gpt-4o-mini", owners={"customer": "acme"}, input_bytes=10)
        p402.release(denied.reservation_id)  # costs nothing: not exported
    return results


def test_stripe_meter_events_follow_stripe_rules(recorded, capsys, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"acme": "cus_Acme123", "globex": "cus_Globex9"}))
    code, out, err = _run(capsys, "billing", "export", "--period", "2026-11", "--format",
                          "stripe", "--customer-map", str(mapping))
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    for row, res in zip(rows, recorded):
        assert set(row) == {"event_name", "identifier", "timestamp", "payload"}
        assert row["identifier"] == "p402-" + res.event_id and len(row["identifier"]) <= 100
        assert re.fullmatch(r"[A-Za-z0-9_\-]{1,100}", row["event_name"])
        assert isinstance(row["timestamp"], int) and row["timestamp"] == (NOV // 1000)
        assert row["payload"]["stripe_customer_id"].startswith("cus_")
        assert re.fullmatch(r"\d+", row["payload"]["value"])  # a whole number, as a string
        # revenue (the price book's +25 %) in micro-USD, half-up
        want = (res.cost_nanos * 125 + 50_000) // 100_000
        assert int(row["payload"]["value"]) == want
    # a re-export is identical: the same identifiers, nothing billed twice
    assert _run(capsys, "billing", "export", "--period", "2026-11", "--format", "stripe",
                "--customer-map", str(mapping))[1] == out


def test_openmeter_events_are_valid_cloudevents(recorded, capsys):
    try:  # cloudevents 2.x keeps the 1.x API under cloudevents.v1
        from cloudevents.v1.http import from_json
    except ImportError:
        from cloudevents.http import from_json

    code, out, err = _run(capsys, "billing", "export", "--period", "2026-11", "--customer",
                          "acme", "--format", "openmeter")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    for line, res in zip(lines, recorded):
        event = from_json(line)  # the CloudEvents SDK validates the structured form
        assert event["specversion"] == "1.0" and event["id"] == res.event_id
        assert event["subject"] == "acme" and event["type"] == "p402.ai_call"
        assert event["source"].startswith("p402/")
        assert event.data["cost_nanos"] == res.cost_nanos
        assert event.data["usage"]["input_tokens"] == 40_000
    # the SDK refuses what is not a CloudEvent (the check above can fail)
    broken = json.loads(lines[0])
    del broken["specversion"]
    with pytest.raises(Exception):
        from_json(json.dumps(broken))


def test_lago_events_and_refusals(recorded, capsys, tmp_path):
    code, out, _ = _run(capsys, "billing", "export", "--period", "2026-11", "--format", "lago",
                        "--name", "ai_calls")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["transaction_id"] for r in rows] == [r.event_id for r in recorded]
    assert {r["code"] for r in rows} == {"ai_calls"}
    assert all(isinstance(r["properties"]["revenue_nanos"], str) for r in rows)
    assert _run(capsys, "billing", "export", "--period", "2026-1", "--format", "lago")[0] == 2
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    assert _run(capsys, "billing", "export", "--period", "2026-11", "--format", "stripe",
                "--customer-map", str(bad))[0] == 2


def test_a_statement_exports_exactly_its_events(recorded, capsys, server, tenant, tmp_path):
    code, out, err = _run(capsys, "statements", "close", "--period", "2026-11",
                          "--customer", "acme")
    assert code == 0, err
    [doc] = json.loads(out)
    st = tmp_path / "st.json"
    st.write_text(json.dumps(doc))
    code, out, err = _run(capsys, "billing", "export", "--statement", str(st), "--format",
                          "lago")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["transaction_id"] for r in rows] == [r.event_id for r in recorded[:2]]
    assert sum(int(r["properties"]["cost_nanos"]) for r in rows) == doc["totals"]["cost_nanos"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert _run(capsys, "billing", "export", "--statement", str(bad), "--format", "lago")[0] == 2

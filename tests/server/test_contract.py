"""Bad input never fails good input or corrupts a ledger (p402core.contract), on SQLite
and PostgreSQL: strings with NUL or other control characters and out-of-range times
are refused at the edge naming the field, before the engine counts anything; a
concurrent crowd of valid Records is never failed by a bad one; the writer isolates an
event whose data the database refuses; a stream ends at its first bad message with
nothing after it committed."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from p402.v1 import admin_pb2, common_pb2, meter_pb2

from p402core.contract import EARLIEST_EVENT_MS, event_time_problem, string_problem
from p402_server.ledger.model import EventFilter, LedgerEvent
from p402_server.ledger.writer import EventRejected, GroupCommitWriter
from tests.server.service_harness import error_info, owners, svc_any, usd  # noqa: F401

MODEL = "gpt-4o-mini"
BAD_STRINGS = ["x\x00y", "line\nbreak", "tab\there", "del\x7f", "c1\x85", "e" * 257]


def record(event_id: str, **kw) -> meter_pb2.RecordRequest:
    kw.setdefault("owners", owners(customer="acme", feature="chat"))
    kw.setdefault("usage", common_pb2.Usage(input_tokens=100, output_tokens=20))
    kw.setdefault("model", MODEL)
    return meter_pb2.RecordRequest(event_id=event_id, **kw)


async def ledger(svc) -> list:
    events, _ = await svc.store.query_events(svc.tenant_id, EventFilter(), page_size=1000)
    return events


def test_the_contract_names_what_is_wrong():
    assert string_problem("ok-value_1.2") is None
    assert "NUL" in string_problem("a\x00b")
    assert "U+000A" in string_problem("a\nb")
    assert "U+0085" in string_problem("a\x85b")
    assert "surrogate" in string_problem("a\ud800")
    assert "longer than 256" in string_problem("x" * 257)
    now = int(time.time() * 1000)
    assert event_time_problem(0, now) is None
    assert event_time_problem(now, now) is None
    assert event_time_problem(2**63 - 1, now)
    assert event_time_problem(EARLIEST_EVENT_MS - 1, now)
    assert event_time_problem(-1, now)


@pytest.mark.parametrize("bad", BAD_STRINGS)
@pytest.mark.parametrize("where", ["owners.feature", "event_id", "labels.env", "model"])
async def test_a_bad_string_in_a_record_is_invalid_argument_naming_it(svc_any, where, bad):
    svc = svc_any
    await svc.admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id="cap", limit=usd(10**9), period=common_pb2.PERIOD_TOTAL)),
        metadata=svc.auth)
    kw = {}
    if where == "owners.feature":
        kw["owners"] = owners(customer="acme", feature=bad)
    elif where == "labels.env":
        kw["labels"] = {"env": bad}
    req = record("ev-bad" if where != "event_id" else bad, **kw)
    if where == "model":
        req.model = bad
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.meter.Record(req, metadata=svc.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == where
    assert await ledger(svc) == []
    [b] = (await svc.admin.ListBudgets(admin_pb2.ListBudgetsRequest(),
                                       metadata=svc.auth)).budgets
    assert b.status.committed.units == 0 and b.status.committed.nanos == 0


async def test_bad_records_never_fail_a_concurrent_crowd_of_good_ones(svc_any):
    svc = svc_any
    good = [svc.meter.Record(record(f"ev-{i}"), metadata=svc.auth) for i in range(150)]
    bad = [svc.meter.Record(record(f"bad-{i}", owners=owners(customer="acme",
                                                              feature="x\x00y")),
                            metadata=svc.auth) for i in range(20)]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(not isinstance(r, Exception) for r in results[:150]), \
        [r for r in results[:150] if isinstance(r, Exception)][:2]
    assert all(isinstance(r, grpc.aio.AioRpcError)
               and r.code() == grpc.StatusCode.INVALID_ARGUMENT for r in results[150:])
    events = await ledger(svc)
    assert len(events) == 150 and all(e.event_id.startswith("ev-") for e in events)
    assert sum(e.cost_nanos for e in events) == sum(r.cost.nanos + r.cost.units * 10**9
                                                    for r in results[:150])


async def test_authorize_refuses_a_bad_owner_or_model_and_stores_nothing(svc_any):
    svc = svc_any
    for field, req in (
        ("owners.customer", meter_pb2.AuthorizeRequest(model=MODEL,
                                                        owners=owners(customer="a\x00"))),
        ("model", meter_pb2.AuthorizeRequest(model="gpt\n4", owners=owners(customer="a"))),
        ("model", meter_pb2.AuthorizeRequest(model="nul\x00model",
                                             owners=owners(customer="a"))),
        ("reservation_id", meter_pb2.AuthorizeRequest(model=MODEL, reservation_id="r\x01")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await svc.meter.Authorize(req, metadata=svc.auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err.value).metadata["field"] == field
    await asyncio.sleep(0.3)  # denied events are written behind: none may appear
    assert await ledger(svc) == []


@pytest.mark.parametrize("ms", [2**63 - 1, -1, 1000, EARLIEST_EVENT_MS - 1,
                                "tomorrow+2h"])
async def test_event_time_outside_the_window_is_refused(svc_any, ms):
    svc = svc_any
    if ms == "tomorrow+2h":
        ms = int(time.time() * 1000) + 26 * 3_600_000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.meter.Record(record("ev-t", event_time_ms=ms), metadata=svc.auth)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "event_time_ms"
    ok = await svc.meter.Record(record("ev-ok", event_time_ms=EARLIEST_EVENT_MS),
                                metadata=svc.auth)
    assert ok.event_id == "ev-ok"


async def test_reports_survive_any_time_already_in_a_ledger(svc_any, monkeypatch, tmp_path,
                                                             capsys):
    """Ledgers written before the window existed may hold any int64 time: Query
    groupings and exports answer, they do not fail."""
    svc = svc_any
    for i, ms in enumerate((2**63 - 1, 0, 1, EARLIEST_EVENT_MS)):
        await svc.server.writer.write(LedgerEvent(
            svc.tenant_id, f"old-{i}", event_ms=ms, customer="acme", model=MODEL,
            cost_nanos=10))
    for g in ("month", "day", "hour"):
        resp = await svc.meter.Query(meter_pb2.QueryRequest(group_by=[g, "customer"]),
                                     metadata=svc.auth)
        assert sum(r.event_count for r in resp.rows) == 4
    events = [e async for e in svc.meter.ExportEvents(meter_pb2.ExportEventsRequest(),
                                                      metadata=svc.auth)]
    assert len(events) == 4
    # The command line lists, exports and sums them (exit 0, the far-future time
    # shown as 9999-12-31).
    from p402_server.cli import main

    monkeypatch.setenv("P402_TARGET", f"127.0.0.1:{svc.port}")
    monkeypatch.setenv("P402_API_KEY", svc.api_key)
    out = tmp_path / "export.csv"
    for argv in (["events", "--since", "1970-01-01"], ["spend", "--by", "month"],
                 ["export", "--format", "csv", "-o", str(out)]):
        code = await asyncio.to_thread(main, argv)
        captured = capsys.readouterr()
        assert code == 0, (argv, captured.err)
    assert "9999-12-31" in out.read_text()


async def test_stream_ends_at_the_first_bad_message_and_commits_nothing_after(svc_any):
    svc = svc_any
    msgs = [record("s-0"), record("s-bad", usage=common_pb2.Usage(input_tokens=-1)),
            *[record(f"s-{i}") for i in range(1, 9)]]

    async def gen():
        for m in msgs:  # sent without waiting for answers
            yield m

    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for r in svc.meter.StreamRecords(gen(), metadata=svc.auth):
            got.append(r.event_id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert got == ["s-0"]
    await asyncio.sleep(0.2)
    assert [e.event_id for e in await ledger(svc)] == ["s-0"]

    batches = [meter_pb2.RecordBatchRequest(records=[record("b-0"), record("b-1")]),
               meter_pb2.RecordBatchRequest(records=[record("b-2", model="m\x00")]),
               meter_pb2.RecordBatchRequest(records=[record("b-3")])]

    async def bgen():
        for b in batches:
            yield b

    answered = []
    with pytest.raises(grpc.aio.AioRpcError):
        async for r in svc.meter.StreamRecordBatches(bgen(), metadata=svc.auth):
            answered += [x.event_id for x in r.results]
    assert answered == ["b-0", "b-1"]
    await asyncio.sleep(0.2)
    assert sorted(e.event_id for e in await ledger(svc)) == ["b-0", "b-1", "s-0"]


async def test_the_writer_isolates_an_event_the_database_refuses(svc_any, monkeypatch):
    """A value the contract let through but the database refuses: only its event
    fails (EventRejected, not retryable); the other events of its batch commit."""
    svc = svc_any
    writer: GroupCommitWriter = svc.server.writer
    ops = writer._ops
    name = "insert_events" if hasattr(ops, "insert_events") else "write_batch"
    real = getattr(ops, name)
    poison = "poisoned-7"

    def refuse_poison(rows):
        if any(poison in map(str, r) for r in rows):
            raise OverflowError("value out of range for the column")  # a data error

    if asyncio.iscoroutinefunction(real):
        async def wrapped(conn, rows):
            refuse_poison(rows)
            return await real(conn, rows)
    else:
        def wrapped(conn, rows):
            refuse_poison(rows)
            return real(conn, rows)
    monkeypatch.setattr(ops, name, wrapped)
    events = [LedgerEvent(svc.tenant_id, f"poisoned-{i}" if i == 7 else f"fine-{i}",
                          customer="acme", model=MODEL, cost_nanos=5) for i in range(40)]
    results = await asyncio.gather(*(writer.write(e) for e in events),
                                   return_exceptions=True)
    assert isinstance(results[7], EventRejected)
    assert all(not isinstance(r, Exception) for i, r in enumerate(results) if i != 7)
    stored = {e.event_id for e in await ledger(svc)}
    assert len(stored) == 39 and "poisoned-7" not in stored
    assert (await svc.store.verify_chain(svc.tenant_id)).ok


def _bad_record(where: str) -> meter_pb2.RecordRequest:
    req = record("ev-1", labels={"env": "prod"})
    if where in ("event_id", "reservation_id", "model", "provider", "retry_of"):
        setattr(req, where, "x\x00y")
    elif where == "model-missing":
        req.model = ""
    elif where == "prompt":
        req.prompt = "a\x00b"
    elif where in ("input_bytes", "attempt"):
        setattr(req, where, -2)
    elif where == "event_time_ms":
        req.event_time_ms = 5
    elif where in ("outcome", "privacy_mode"):
        setattr(req, where, 99)
    elif where == "outcome-denied":
        req.outcome = common_pb2.OUTCOME_DENIED
    elif where == "owners.customer":
        req.owners.customer = "c\n"
    elif where == "labels-many":
        req.labels.update({f"k{i}": "v" for i in range(17)})
    elif where == "labels-empty-key":
        req.labels[""] = "v"
    elif where == "labels.env":
        req.labels["env"] = "\x7f"
    elif where == "labels-key":
        req.labels["k\x00"] = "v"
    elif where == "usage.output_tokens":
        req.usage.output_tokens = -1
    elif where == "usage.images":
        req.usage.images = 10**9
    elif where == "usage.reasoning_tokens":
        req.usage.reasoning_tokens = 21
    elif where == "revenue.currency_code":
        req.revenue.currency_code = "EUR"
    return req


@pytest.mark.parametrize("where, field", [
    ("event_id", "event_id"), ("reservation_id", "reservation_id"), ("model", "model"),
    ("provider", "provider"), ("retry_of", "retry_of"), ("model-missing", "model"),
    ("prompt", "prompt"), ("input_bytes", "input_bytes"), ("attempt", "attempt"),
    ("event_time_ms", "event_time_ms"), ("outcome", "outcome"),
    ("outcome-denied", "outcome"), ("privacy_mode", "privacy_mode"),
    ("owners.customer", "owners.customer"), ("labels-many", "labels"),
    ("labels-empty-key", "labels"), ("labels.env", "labels.env"), ("labels-key", "labels"),
    ("usage.output_tokens", "usage.output_tokens"), ("usage.images", "usage.images"),
    ("usage.reasoning_tokens", "usage.reasoning_tokens"),
    ("revenue.currency_code", "revenue.currency_code"),
])
def test_validate_record_names_the_field_under_its_prefix(where, field):
    from p402_server.wire.convert import validate_record
    from p402core import InvalidArgument

    with pytest.raises(InvalidArgument) as err:
        validate_record(_bad_record(where), "records[3].")
    assert err.value.field == "records[3]." + field


def test_validate_record_returns_the_request_checked():
    from p402_server.wire.convert import validate_record

    req = record("ev-1", labels={"env": "prod", "team": "a"},
                 usage=common_pb2.Usage(input_tokens=100, output_tokens=20, images=2,
                                        cache_write_1h_tokens=5, service_tier="batch"))
    owners_, labels, usage, revenue = validate_record(req, "records[0].")
    assert owners_ == ("acme", "chat", "", "", "", "")
    assert labels == {"env": "prod", "team": "a"}
    assert usage == (100, 0, 0, 20, 0, {"cache_write_1h_tokens": 5, "images": 2}, "batch")
    assert list(usage[5]) == ["cache_write_1h_tokens", "images"]  # in UNITS order
    assert revenue == 0
    assert validate_record(record("ev-2"))[1] is None  # no labels

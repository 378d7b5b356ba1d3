"""The proxy's in-process runtime and its Records behind the answer.

`p402 proxy --db` calls the meter service in its own process (inprocess.py): the same
key checks, errors and results as over gRPC. Every proxied call's Record is queued
with its event id and committed behind the caller's answer; a full queue makes the
proxy wait, never drop; every call lands in the ledger exactly once.
"""
from __future__ import annotations

import asyncio
import types

import grpc
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p402_client import _convert as cv
from p402_client import errors as e
from p402_server.gateways import inprocess
from p402_server.gateways.inprocess import EmbeddedP402, InProcessClient
from p402_server.gateways.proxy import PROXY_KEY, ProxyConfig, start_proxy
from p402_server.ledger import open_store
from p402_server.ledger.model import EventFilter
from p402_server.server import init_tenant
from p402_server.wire import convert
from p402_server.wire.errors import ServiceError
from tests.proxy.conftest import UPSTREAM_KEY
from tests.support.openai_standin import OpenAIStandin

LIMIT = 150_000  # nano-USD: room for about ten of the calls below
MESSAGES = [{"role": "user", "content": "Summarize the quarterly report in one line."}]


class Gate:
    """Holds the writer's transactions until opened (a slow or stalled ledger)."""

    def __init__(self, writer):
        self.open = asyncio.Event()
        self.waiting = 0
        inner = writer._transaction

        async def gated(batch):
            self.waiting += 1
            try:
                await self.open.wait()
            finally:
                self.waiting -= 1
            return await inner(batch)

        writer._transaction = gated


@pytest.fixture
async def embedded(tmp_path):
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    tenant, admin_key = await init_tenant(store, "embedded")
    emb = EmbeddedP402(store)
    await emb.start()
    try:
        yield emb, tenant, admin_key
    finally:
        await emb.stop()
        await store.close()


async def ledger(store, tenant) -> list:
    events, _ = await store.query_events(tenant, EventFilter(), page_size=1000)
    return events


async def test_in_process_client_gives_the_wire_results_and_errors(embedded):
    emb, tenant, admin_key = embedded
    admin = emb.client(admin_key)
    assert isinstance(admin, InProcessClient)
    assert (await admin.ping()).tenant == tenant
    meter_key = (await admin.create_key("caller", ["meter"])).api_key
    meter = emb.client(meter_key)

    auth = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                 input_bytes=400, max_output_tokens=50)
    assert auth.allowed and auth.reservation_id
    rec = await meter.record(auth.reservation_id, input_tokens=100, output_tokens=20)
    assert not rec.duplicate and rec.cost_nanos > 0
    again = await meter.record(auth.reservation_id, input_tokens=100, output_tokens=20,
                               event_id=rec.event_id)
    assert again.duplicate and again.event_id == rec.event_id
    [ev] = await ledger(emb.store, tenant)
    assert (ev.event_id, ev.customer, ev.cost_nanos) == (rec.event_id, "acme",
                                                         rec.cost_nanos)

    # The same typed errors as over gRPC, naming the field.
    with pytest.raises(e.Unauthenticated):
        await emb.client("p402_not_a_key").ping()
    with pytest.raises(e.PermissionDenied):
        await meter.create_key("nope", ["admin"])
    with pytest.raises(e.InvalidArgument) as err:
        await meter.record(auth.reservation_id, input_tokens=1, output_tokens=1,
                           event_id="x" * 10_000)
    assert err.value.field == "event_id"
    with pytest.raises(e.NotFound) as err:
        await meter.release("01HZZZZZZZZZZZZZZZZZZZZZZZ")
    assert err.value.field == "reservation_id"
    # Server-streamed calls work in process too (the export's signed digest rides
    # on the trailing metadata).
    exported = [x async for x in admin.export()]
    assert [x.event_id for x in exported] == [rec.event_id]


async def test_in_process_authorize_retries_without_a_reservation_id_and_holds_once(
        embedded, monkeypatch):
    # In process a failed Authorize held nothing, so its retry needs no client-made
    # reservation id: one hold for the call, and no answer kept for replays.
    emb, tenant, admin_key = embedded
    meter_key = (await emb.client(admin_key).create_key("caller", ["meter"])).api_key
    meter = emb.client(meter_key)
    meter._backoff = 0.0
    rt = await emb.runtime.get(tenant)
    real, calls = rt.authorize, []

    def flaky(req, exact=None, core=False):
        calls.append(req.reservation_id)
        if len(calls) == 1:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "store down")
        return real(req, exact, core)

    monkeypatch.setattr(rt, "authorize", flaky)
    auth = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                 max_output_tokens=10)
    assert auth.allowed and calls == ["", ""]  # retried once, no id of the client's
    assert [h["reservation_id"] for h in rt.engine.hold_records()] == [auth.reservation_id]
    assert len(rt._authorizations) == 0


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_NANOS = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(decision=st.integers(0, 9), reasons=st.lists(_TEXT, max_size=3),
       rule_ids=st.lists(_TEXT, max_size=3), text=_TEXT,
       counts=st.tuples(*[st.integers(0, 2**63 - 1)] * 4), cost=_NANOS,
       budgets=st.lists(st.builds(
           types.SimpleNamespace, budget_id=_TEXT, limit_nanos=_NANOS,
           committed_nanos=_NANOS, held_nanos=_NANOS, remaining_nanos=_NANOS,
           period_start_ms=st.integers(0, 2**63 - 1), enforcement=st.integers(0, 2)),
           max_size=3))
def test_the_engines_answer_reads_as_its_message_would(decision, reasons, rule_ids, text,
                                                       counts, cost, budgets):
    # In process the client's Authorization is made from the engine's own answer;
    # it must be what the AuthorizeResponse of it reads as, unknown enum numbers and
    # the int64 bounds of money included.
    a = types.SimpleNamespace(
        decision=decision, reasons=reasons, rule_ids=rule_ids, reservation_id=text,
        model=text + "m", provider=text + "p", catalog_version=text + "v",
        estimated_input_tokens=counts[0], estimated_output_tokens=counts[1],
        output_token_cap=counts[2], expires_ms=counts[3], estimated_cost_nanos=cost,
        budgets=budgets)
    expected = cv.authorization(convert.authorization_to_proto(a))
    assert inprocess.authorization_from_core(a) == expected


async def test_in_process_authorize_answers_and_refuses_as_the_rpc_does(embedded):
    emb, tenant, admin_key = embedded
    admin = emb.client(admin_key)
    await admin.put_budget("cap", limit_nanos=LIMIT, period="MONTH", enforcement="HARD",
                           scope={"customer": "acme"})
    meter = emb.client((await admin.create_key("caller", ["meter"])).api_key)
    auth = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                 max_output_tokens=50)
    [status] = auth.budgets
    assert auth.allowed and status.budget_id == "cap" and status.limit_nanos == LIMIT
    assert status.held_nanos == auth.estimated_cost_nanos > 0
    assert status.enforcement.name == "HARD" and auth.output_token_cap == 50
    # A caller's own reservation id is answered from the first decision on a retry.
    first = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                  max_output_tokens=50, reservation_id="rsv-mine")
    again = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                  max_output_tokens=50, reservation_id="rsv-mine")
    assert again == first and first.reservation_id == "rsv-mine"
    rt = await emb.runtime.get(tenant)
    assert len(rt.engine.hold_records()) == 2
    # A DENY is data; errors are the RPC's, naming the field.
    big = await meter.authorize("gpt-4o-mini", owners={"customer": "acme"},
                                input_bytes=10**7)
    assert big.denied and big.reasons and big.budgets[0].budget_id == "cap"
    with pytest.raises(e.InvalidArgument) as err:
        await meter.authorize("gpt-4o-mini", max_output_tokens=2**40)
    assert err.value.field == "max_output_tokens"
    with pytest.raises(e.Unauthenticated):
        await emb.client("p402_" + "x" * 40).authorize("gpt-4o-mini")
    reader = emb.client((await admin.create_key("reader", ["read"])).api_key)
    with pytest.raises(e.PermissionDenied):
        await reader.authorize("gpt-4o-mini")


async def test_in_process_deadline_is_deadline_exceeded(embedded):
    emb, _tenant, admin_key = embedded
    gate = Gate(emb.writer)
    c = emb.client(admin_key, timeout=0.2)
    c.retries = 0
    with pytest.raises(e.DeadlineExceeded):
        await c.record(model="gpt-4o-mini", owners={"customer": "acme"},
                       input_tokens=1, output_tokens=1)
    gate.open.set()


async def test_in_process_unary_arms_its_deadline_only_when_the_handler_waits(
        monkeypatch):
    from p402_server.gateways import inprocess
    timers = []
    real = asyncio.timeout

    def counted(delay):
        timers.append(delay)
        return real(delay)

    monkeypatch.setattr(inprocess.asyncio, "timeout", counted)
    cleaned = []

    async def handler(request, context):
        if request == "now":
            return "answer"
        if request == "refuse":
            raise ValueError("refused before waiting")
        try:
            await asyncio.sleep(float(request))
            return f"slept {request}"
        finally:
            cleaned.append(request)

    unary = inprocess._Unary(handler)
    assert await unary("now", timeout=5.0) == "answer"
    with pytest.raises(ValueError, match="refused before waiting"):
        await unary("refuse", timeout=5.0)
    assert timers == []  # neither waited: no deadline timer
    assert await unary("0.01", timeout=5.0) == "slept 0.01"
    assert await unary("0", timeout=5.0) == "slept 0"  # a bare yield to the loop
    assert timers == [5.0, 5.0]
    # Past the deadline: DEADLINE_EXCEEDED, and the handler's own cleanup ran.
    with pytest.raises(inprocess.InProcessRpcError) as err:
        await unary("10", timeout=0.05)
    assert err.value.code().name == "DEADLINE_EXCEEDED" and cleaned[-1] == "10"
    # The caller cancelled while the handler waits: the cancellation reaches it.
    call = asyncio.ensure_future(unary("10", timeout=5.0))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cleaned == ["0.01", "0", "10", "10"]


@pytest.fixture
async def proxy(embedded):
    emb, tenant, admin_key = embedded
    meter_key = (await emb.client(admin_key).create_key("caller", ["meter"])).api_key
    async with OpenAIStandin(api_key=UPSTREAM_KEY) as up:
        config = ProxyConfig(upstream=up.base_url, upstream_key=UPSTREAM_KEY)
        runner, port = await start_proxy(config, None, "127.0.0.1:0", embedded=emb)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                    api_key=meter_key, max_retries=0, timeout=20.0,
                                    default_headers={"x-p402-customer": "acme"})
        try:
            yield emb, tenant, client, runner
        finally:
            await runner.cleanup()


async def test_the_answer_does_not_wait_for_the_ledger(proxy):
    emb, tenant, client, _runner = proxy
    gate = Gate(emb.writer)
    raw = await asyncio.wait_for(client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES), 10)
    assert raw.parse().usage.completion_tokens == 20
    event_id = raw.headers["x-p402-event-id"]
    assert await ledger(emb.store, tenant) == []  # answered, not yet committed
    gate.open.set()
    for _ in range(500):
        events = await ledger(emb.store, tenant)
        if events:
            break
        await asyncio.sleep(0.01)
    [ev] = events
    assert ev.event_id == event_id and ev.kind == "record" and ev.output_tokens == 20


async def test_a_full_record_queue_makes_the_proxy_wait_and_loses_nothing(proxy):
    emb, tenant, client, runner = proxy
    meter = runner.app[PROXY_KEY].meter
    meter.record_queue = 2  # tiny queue: the third answer must wait for room
    gate = Gate(emb.writer)
    calls = [asyncio.ensure_future(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES)) for _ in range(5)]
    for _ in range(2000):  # the first two answers come back: their Records fit
        if sum(c.done() for c in calls) >= 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    done = [c for c in calls if c.done()]
    assert len(done) == 2  # the other three wait for room: held back, not failed
    assert all(c.exception() is None for c in done)
    gate.open.set()
    await asyncio.wait_for(asyncio.gather(*calls), 20)
    await meter.flush(10)
    events = await ledger(emb.store, tenant)
    assert len(events) == 5 and len({ev.event_id for ev in events}) == 5
    assert {ev.reservation_id for ev in events} == {ev.reservation_id for ev in events
                                                    if ev.kind == "record"}


async def test_every_concurrent_call_lands_once_and_a_hard_budget_holds(proxy):
    emb, tenant, client, runner = proxy
    admin = emb.client((await emb.store.create_key(tenant, ["admin"], "t"))[1])
    await admin.put_budget("acme-cap", limit_nanos=LIMIT, period="TOTAL",
                           enforcement="HARD", scope={"customer": "acme"})
    results = await asyncio.gather(*(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20) for _ in range(60)),
        return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    denied = [r for r in results if isinstance(r, openai.APIStatusError)
              and r.status_code == 402]
    assert len(ok) + len(denied) == 60 and ok and denied
    await runner.app[PROXY_KEY].meter.flush(10)
    events = await ledger(emb.store, tenant)
    records = [ev for ev in events if ev.kind == "record"]
    assert len(records) == len(ok)
    assert len({ev.reservation_id for ev in records}) == len(ok)
    assert sum(ev.cost_nanos for ev in records) <= LIMIT


def test_proxy_lease_needs_an_embedded_runtime(capsys):
    from p402_server.cli import main

    code = main(["proxy", "--upstream", "http://127.0.0.1:9/v1", "--target",
                 "127.0.0.1:4020", "--lease", "on"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("p402: error: --lease:")


def test_embedded_proxy_reads_the_server_settings_from_the_environment(
        tmp_path, monkeypatch, capsys):
    import logging

    from p402_server.cli import main

    monkeypatch.setenv("P402_HOLDS_FLUSH_INTERVAL_SECONDS", "0")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # the command sets up the process's logging: put the test run's back
        code = main(["proxy", "--upstream", "http://127.0.0.1:9/v1", "--listen",
                     "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path}/l.db"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert code == 2 and "holds_flush_interval_seconds" in err and "> 0" in err


async def test_embedded_proxy_runs_on_the_settings_it_is_given(tmp_path, monkeypatch):
    from p402_server.gateways import proxy as proxy_mod
    from p402_server.gateways.inprocess import EmbeddedP402

    monkeypatch.setenv("P402_HOLDS_FLUSH_INTERVAL_SECONDS", "0.05")
    monkeypatch.setenv("P402_WRITER_MAX_BATCH", "77")
    seen = []
    started = EmbeddedP402.start

    async def spy(self):
        seen.append(self.config)
        await started(self)

    monkeypatch.setattr(EmbeddedP402, "start", spy)
    import gc

    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    stop = asyncio.Event()
    task = asyncio.ensure_future(proxy_mod.serve_proxy(
        ProxyConfig(upstream="http://127.0.0.1:9/v1"), "127.0.0.1:0",
        db=f"sqlite+aiosqlite:///{tmp_path}/l.db", stop_event=stop,
        ready=lambda port: stop.set()))
    await asyncio.wait_for(task, 30)
    assert seen and seen[0].holds_flush_interval_seconds == 0.05
    assert seen[0].writer_max_batch == 77
    # a host application's garbage collector is left alone (gc_tuning is the CLI's)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (thresholds, frozen)

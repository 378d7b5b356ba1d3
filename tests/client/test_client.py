"""The Python SDK against a real P402 server (tmp SQLite ledger): every method, the
typed results, the error mapping with the field named, retries and idempotency."""
from __future__ import annotations

import dataclasses
import json
import threading
import time

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import p402_client as pc
from p402_client import _convert as cv
from p402_client.errors import from_rpc_error
from p402_client.ids import encode_ulid, new_ulid, ulid_time_ms
from tests.client.serverthread import ServerThread, free_port

MODEL = "gpt-4o-mini"
USD = 1_000_000_000


def expected_cost_nanos(price: pc.Price, input_tokens: int, output_tokens: int) -> int:
    """Cost of plain (uncached, no reasoning) usage, computed exactly in pico-USD."""
    pico = (input_tokens * price.input_pico_per_token
            + output_tokens * price.output_pico_per_token)
    return (pico + 500) // 1000


# ---------------------------------------------------------------- meter calls


def test_ping_names_the_keys_tenant(p402, tenant):
    pong = p402.ping()
    assert isinstance(pong, pc.Ping)
    assert pong.tenant == tenant[0]
    assert pong.implementation in ("python", "compiled")


def test_authorize_returns_a_typed_frozen_authorization(p402):
    auth = p402.authorize(MODEL, owners={"customer": "acme", "feature": "chat"},
                          labels={"env": "test"}, input_bytes=4000, max_output_tokens=300)
    assert isinstance(auth, pc.Authorization)
    assert auth.decision is pc.Decision.ALLOW and auth.decision == "ALLOW"
    assert auth.allowed and not auth.denied
    assert auth.reservation_id
    assert auth.model == MODEL and auth.provider == "openai"
    assert auth.output_token_cap == 300
    assert auth.estimated_output_tokens == 300
    assert auth.estimated_input_tokens > 0
    price = p402.list_prices(MODEL).items[0]
    # The worst case (no cache hits) is what is reserved.
    assert auth.estimated_cost_nanos == expected_cost_nanos(
        price, auth.estimated_input_tokens, auth.estimated_output_tokens)
    assert isinstance(auth.estimated_cost_nanos, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        auth.decision = pc.Decision.DENY  # type: ignore[misc]


def test_record_settles_with_exact_cost_and_budget_status(p402):
    p402.put_budget("acme", limit_nanos=10 * USD, scope={"customer": "acme"})
    auth = p402.authorize(MODEL, owners={"customer": "acme"}, input_bytes=2000,
                          max_output_tokens=500)
    assert [b.budget_id for b in auth.budgets] == ["acme"]
    assert auth.budgets[0].held_nanos == auth.estimated_cost_nanos
    res = p402.record(auth.reservation_id, input_tokens=480, output_tokens=123,
                      revenue_nanos=5_000_000)
    assert isinstance(res, pc.RecordResult)
    price = p402.list_prices(MODEL).items[0]
    assert res.cost_nanos == expected_cost_nanos(price, 480, 123)
    assert res.estimated_cost_nanos == auth.estimated_cost_nanos
    assert res.evidence is pc.Evidence.REPORTED
    assert res.duplicate is False
    (status,) = res.budgets
    assert status.committed_nanos == res.cost_nanos
    assert status.held_nanos == 0
    assert status.remaining_nanos == 10 * USD - res.cost_nanos
    (event,) = p402.query().items
    assert event.event_id == res.event_id
    assert event.owners.customer == "acme"  # from the reservation
    assert event.revenue_nanos == 5_000_000
    assert event.usage == pc.Usage(input_tokens=480, output_tokens=123)


def test_record_generates_time_sortable_event_ids(p402):
    before = time.time_ns() // 1_000_000
    ids = [p402.record(model=MODEL, owners={"customer": "c"}, input_tokens=10).event_id
           for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert all(len(i) == 26 for i in ids)
    assert ulid_time_ms(ids[0]) >= before - 1000


def test_record_same_event_id_twice_counts_once(p402):
    p402.put_budget("all", limit_nanos=USD)
    first = p402.record(model=MODEL, owners={"customer": "x"}, input_tokens=1000,
                        output_tokens=100, event_id="evt-fixed-1")
    again = p402.record(model=MODEL, owners={"customer": "x"}, input_tokens=1000,
                        output_tokens=100, event_id="evt-fixed-1")
    assert first.event_id == again.event_id == "evt-fixed-1"
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.cost_nanos == first.cost_nanos
    assert len(p402.query().items) == 1
    (budget,) = p402.list_budgets().items
    assert budget.status.committed_nanos == first.cost_nanos


def test_record_outcome_as_enum_or_str(p402):
    a = p402.record(model=MODEL, owners={"customer": "c"}, input_tokens=5,
                    outcome=pc.Outcome.TIMEOUT)
    b = p402.record(model=MODEL, owners={"customer": "c"}, input_tokens=5,
                    outcome="provider_error")
    outcomes = {e.event_id: e.outcome for e in p402.query().items}
    assert outcomes[a.event_id] is pc.Outcome.TIMEOUT
    assert outcomes[b.event_id] is pc.Outcome.PROVIDER_ERROR


def test_record_batch_results_in_order(p402):
    records = [{"model": MODEL, "owners": {"customer": f"c{i}"}, "input_tokens": 100 * (i + 1),
                "output_tokens": 10} for i in range(5)]
    records[2]["event_id"] = "batch-fixed"
    results = p402.record_batch(records)
    assert [r.duplicate for r in results] == [False] * 5
    assert results[2].event_id == "batch-fixed"
    costs = [r.cost_nanos for r in results]
    assert costs == sorted(costs) and len(set(costs)) == 5  # more input, more cost
    by_customer = {e.owners.customer: e.event_id for e in p402.query().items}
    assert by_customer == {f"c{i}": results[i].event_id for i in range(5)}


def test_record_batch_names_the_bad_record(p402):
    with pytest.raises(pc.InvalidArgument) as exc:
        p402.record_batch([{"model": MODEL, "owners": {"customer": "a"}},
                           {"model": MODEL, "input_tokens": -1}])
    assert exc.value.field == "records[1].usage.input_tokens"


def test_release_voids_the_hold(p402):
    p402.put_budget("b", limit_nanos=USD)
    auth = p402.authorize(MODEL, owners={"customer": "r"}, input_bytes=100)
    assert auth.budgets[0].held_nanos > 0
    rel = p402.release(auth.reservation_id)
    assert isinstance(rel, pc.ReleaseResult)
    assert rel.budgets[0].held_nanos == 0 and rel.budgets[0].committed_nanos == 0
    with pytest.raises(pc.NotFound) as exc:
        p402.release("no-such-reservation")
    assert exc.value.field == "reservation_id"
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_denial_is_data_and_becomes_an_event(p402):
    p402.put_budget("tiny", limit_nanos=1, scope={"customer": "poor"})
    auth = p402.authorize(MODEL, owners={"customer": "poor"}, input_bytes=1000)
    assert auth.decision is pc.Decision.DENY and auth.denied and not auth.allowed
    assert "budget.exceeded" in auth.reasons
    for _ in range(100):  # denied events are written behind the response
        events = p402.query(decisions=["DENY"]).items
        if events:
            break
        time.sleep(0.02)
    (event,) = events
    assert event.kind == "denied" and event.outcome is pc.Outcome.DENIED
    assert event.cost_nanos == 0 and "budget.exceeded" in event.reasons


def test_query_filters_pages_and_iterates(p402):
    p402.record_batch([{"model": MODEL, "owners": {"customer": "acme" if i % 3 else "globex",
                                                   "feature": "chat"},
                        "input_tokens": 10 + i} for i in range(12)])
    acme = p402.query(owners={"customer": "acme"}).items
    assert len(acme) == 8 and all(e.owners.customer == "acme" for e in acme)
    first = p402.query(page_size=5)
    assert len(first) == 5 and first.next_page_token
    seqs = [e.sequence for e in first]
    assert seqs == sorted(seqs, reverse=True)  # newest first
    everything = list(p402.iter_query(page_size=5))
    assert len(everything) == 12
    assert len({e.event_id for e in everything}) == 12
    assert [e.event_id for e in everything[:5]] == [e.event_id for e in first]
    assert p402.query(since=time.time_ns() // 1_000_000 + 60_000).items == ()


def test_query_group_by_returns_spend_rows(p402):
    p402.record_batch([{"model": MODEL, "owners": {"customer": c}, "input_tokens": n,
                        "output_tokens": 1, "revenue_nanos": 1000}
                       for c, n in (("a", 1000), ("a", 2000), ("b", 500))])
    rows = p402.query(group_by=["customer"]).items
    assert all(isinstance(r, pc.SpendRow) for r in rows)
    by = {r.group["customer"]: r for r in rows}
    assert by["a"].event_count == 2 and by["b"].event_count == 1
    assert by["a"].usage.input_tokens == 3000
    assert by["a"].revenue_nanos == 2000
    assert by["a"].margin_nanos == 2000 - by["a"].cost_nanos
    events = p402.query().items
    assert sum(r.cost_nanos for r in rows) == sum(e.cost_nanos for e in events)
    assert rows[0].cost_nanos >= rows[1].cost_nanos  # highest cost first


def test_export_streams_every_event_in_ledger_order(p402):
    p402.record_batch([{"model": MODEL, "owners": {"customer": "e"}, "input_tokens": i + 1}
                       for i in range(25)])
    exported = list(p402.export())
    assert len(exported) == 25
    seqs = [e.sequence for e in exported]
    assert seqs == sorted(seqs)
    assert all(isinstance(e, pc.Event) for e in exported)
    assert list(p402.export(owners={"customer": "nobody"})) == []
    stream = p402.export()
    assert next(stream).sequence == seqs[0]
    stream.close()  # stopping early cancels the stream; the client stays usable
    assert len(p402.query(page_size=30).items) == 25
    # JSON-ready dicts: enums by name, nested owners.
    d = exported[0].to_dict()
    assert json.loads(json.dumps(d))["outcome"] == "SUCCESS"
    assert d["owners"]["customer"] == "e"


# ---------------------------------------------------------------- admin calls


def test_keys_create_list_revoke(p402, server):
    created = p402.create_key("gw", ["meter", "read"])
    assert created.api_key.startswith("p402_")
    assert set(created.key.scopes) == {pc.Scope.METER, pc.Scope.READ}
    assert created.api_key.startswith(created.key.prefix)
    keys = {k.key_id: k for k in p402.paginate(p402.list_keys)}
    assert created.key.key_id in keys and keys[created.key.key_id].active
    with pc.P402Client(server.target, api_key=created.api_key) as gw:
        assert gw.ping().tenant
        with pytest.raises(pc.PermissionDenied):
            gw.list_keys()
        revoked = p402.revoke_key(created.key.key_id)
        assert not revoked.active and revoked.revoke_time_ms > 0
        with pytest.raises(pc.Unauthenticated) as exc:
            gw.ping()
        assert exc.value.field == "authorization"


def test_budgets_put_list_delete(p402):
    b = p402.put_budget("feat-daily", limit_nanos=5 * USD, period="day",
                        soft_limit_nanos=4 * USD, enforcement=pc.Enforcement.SOFT,
                        scope={"feature": "chat", "label.env": "prod"})
    assert isinstance(b, pc.Budget)
    assert (b.limit_nanos, b.soft_limit_nanos) == (5 * USD, 4 * USD)
    assert b.period is pc.Period.DAY and b.enforcement is pc.Enforcement.SOFT
    assert b.scope == {"feature": "chat", "label.env": "prod"}
    listed = p402.list_budgets().items
    assert [x.budget_id for x in listed] == ["feat-daily"]
    assert listed[0].status.remaining_nanos == 5 * USD
    p402.delete_budget("feat-daily")
    assert p402.list_budgets().items == ()
    with pytest.raises(pc.NotFound) as exc:
        p402.delete_budget("feat-daily")
    assert exc.value.field == "budget_id"


def test_policy_rules_put_list_delete_and_enforce(p402):
    rule = p402.put_policy_rule("need-customer", "REQUIRE_OWNERS",
                                require_owners=["customer"], message="name the customer")
    assert rule.effect is pc.Effect.REQUIRE_OWNERS
    assert rule.require_owners == ("customer",)
    rl = p402.put_policy_rule("rl", pc.Effect.RATE_LIMIT, owners={"feature": "search"},
                              rate_limit=2, rate_unit="requests", window_seconds=60,
                              per="customer")
    assert (rl.rate_limit, rl.rate_unit, rl.per) == (2, pc.RateUnit.REQUESTS, "customer")
    assert {r.rule_id for r in p402.list_policy_rules()} == {"need-customer", "rl"}
    denied = p402.authorize(MODEL, owners={"feature": "chat"}, input_bytes=10)
    assert denied.denied and "policy.owner_missing" in denied.reasons
    assert "need-customer" in denied.rule_ids
    decisions = [p402.authorize(MODEL, owners={"customer": "z", "feature": "search"},
                                input_bytes=10).decision for _ in range(3)]
    assert decisions == [pc.Decision.ALLOW, pc.Decision.ALLOW, pc.Decision.DENY]
    p402.delete_policy_rule("need-customer")
    assert p402.authorize(MODEL, owners={"feature": "chat"}, input_bytes=10).allowed


def test_import_and_list_prices(p402, tmp_path):
    price_map = {"acme-llm-1": {"litellm_provider": "acme", "mode": "chat",
                                "input_cost_per_token": 0.000001,
                                "output_cost_per_token": 0.000004,
                                "max_output_tokens": 2048}}
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(price_map))
    result = p402.import_prices(path)
    assert isinstance(result, pc.PriceImport)
    assert result.imported_count == 1 and result.catalog_version
    (price,) = p402.list_prices("acme-llm").items
    assert price.tenant_override
    assert (price.input_pico_per_token, price.output_pico_per_token) == (1_000_000, 4_000_000)
    res = p402.record(model="acme-llm-1", owners={"customer": "p"}, input_tokens=1000,
                      output_tokens=100)
    assert res.cost_nanos == 1000 * 1_000 + 100 * 4_000  # pico/token -> nanos exactly
    assert len(p402.list_prices().items) > 1  # the shipped catalog is still there


def test_settings_get_and_update_only_the_given_fields(p402):
    before = p402.get_settings()
    assert isinstance(before, pc.Settings)
    after = p402.update_settings(hold_ttl_seconds=before.hold_ttl_seconds + 60,
                                 allow_clamp=not before.allow_clamp)
    assert after.hold_ttl_seconds == before.hold_ttl_seconds + 60
    assert after.allow_clamp is (not before.allow_clamp)
    assert after.default_output_tokens == before.default_output_tokens
    assert p402.get_settings() == after
    with pytest.raises(pc.InvalidArgument) as exc:
        p402.update_settings(hold_ttl=5)
    assert exc.value.field == "settings.hold_ttl"


# ---------------------------------------------------------------- errors


def test_server_invalid_argument_names_the_field(p402):
    with pytest.raises(pc.InvalidArgument) as exc:
        p402.authorize(MODEL, owners={"customer": "x" * 300})
    assert exc.value.field == "owners.customer"
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(exc.value, ValueError)
    with pytest.raises(pc.InvalidArgument) as exc:
        p402.query(group_by=["colour"])
    assert exc.value.field == "group_by"
    with pytest.raises(pc.InvalidArgument) as exc:
        p402.query(page_token="not-a-token")
    assert exc.value.field == "page_token"


def test_client_side_checks_name_the_field_without_a_call():
    # Port 9 (discard) is never a P402 server: nothing below may reach the network.
    with pc.P402Client("127.0.0.1:9", api_key="p402_x", retries=0) as client:
        cases = [
            (lambda: client.record(model=MODEL, outcome="exploded"), "outcome"),
            (lambda: client.record(model=MODEL, input_tokens=-5), "usage.input_tokens"),
            (lambda: client.record(model=MODEL, output_tokens=1.5), "usage.output_tokens"),
            (lambda: client.record(), "model"),
            (lambda: client.record(model=MODEL, colour="red"), "colour"),
            (lambda: client.authorize(MODEL, owners={"team": "x"}), "owners"),
            (lambda: client.authorize("", input_bytes=1), "model"),
            (lambda: client.authorize(MODEL, privacy_mode="loud"), "privacy_mode"),
            (lambda: client.query(outcomes=["nope"]), "filter.outcomes[0]"),
            (lambda: client.put_budget("b", limit_nanos=-1), "budget.limit"),
            (lambda: client.put_policy_rule("r", "BOOM"), "rule.effect"),
            (lambda: client.create_key("k", []), "scopes"),
        ]
        for call, field in cases:
            with pytest.raises(pc.InvalidArgument) as exc:
                call()
            assert exc.value.field == field, (field, exc.value)
    with pytest.raises(pc.InvalidArgument) as exc:
        pc.P402Client("127.0.0.1:9", api_key="")
    assert exc.value.field == "api_key"


def test_bad_key_is_unauthenticated(server):
    with pc.P402Client(server.target, api_key="p402_" + "x" * 40) as client:
        with pytest.raises(pc.Unauthenticated) as exc:
            client.ping()
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.reason  # the server's ErrorInfo reason, not empty


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def _status_trailer(code: grpc.StatusCode, reason: str, **metadata: str):
    info = error_details_pb2.ErrorInfo(reason=reason, domain="p402.dev", metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message="m", details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, pc.InvalidArgument),
    (grpc.StatusCode.UNAUTHENTICATED, pc.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, pc.PermissionDenied),
    (grpc.StatusCode.NOT_FOUND, pc.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, pc.FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, pc.ResourceExhausted),
    (grpc.StatusCode.UNAVAILABLE, pc.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, pc.DeadlineExceeded),
    (grpc.StatusCode.INTERNAL, pc.P402Error),
])
def test_error_mapping_reads_error_info(code, cls):
    err = from_rpc_error(_FakeRpcError(code, "went wrong",
                                       _status_trailer(code, "SOME_REASON", field="a.b")))
    assert type(err) is cls
    assert (err.code, err.reason, err.field) == (code, "SOME_REASON", "a.b")
    assert err.message.endswith("went wrong")
    # No details at all: still typed, the code stands in for the reason.
    bare = from_rpc_error(_FakeRpcError(code, "x"))
    assert type(bare) is cls and bare.reason == code.name and bare.field == ""


def test_failed_precondition_on_releasing_a_recorded_reservation(p402):
    auth = p402.authorize(MODEL, owners={"customer": "fp"}, input_bytes=100)
    p402.record(auth.reservation_id, input_tokens=10, output_tokens=1)
    with pytest.raises(pc.FailedPrecondition) as exc:
        p402.release(auth.reservation_id)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert exc.value.reason


# ---------------------------------------------------------------- retries


def test_retries_until_a_late_server_is_up(tmp_path):
    port = free_port()
    late = ServerThread(f"sqlite+aiosqlite:///{tmp_path / 'late.db'}", port=port,
                        start_delay=0.4)
    late.start(wait=False)
    try:
        with pc.P402Client(f"127.0.0.1:{port}", api_key="p402_" + "y" * 40, retries=0,
                           timeout=2.0) as eager:
            with pytest.raises(pc.Unavailable):
                eager.ping()  # nothing listens yet, and no retry
        with pc.P402Client(f"127.0.0.1:{port}", api_key="p402_" + "y" * 40, retries=8,
                           backoff=0.1, max_backoff=0.5, timeout=2.0) as patient:
            # Reaching the server is what counts: the key is unknown there.
            with pytest.raises(pc.Unauthenticated):
                patient.ping()
        late.wait_started()
    finally:
        late.wait_started()
        late.stop()


class _DropFirstResponse(grpc.UnaryUnaryClientInterceptor):
    """Lets the first call of `method` reach the server, then loses its answer
    (UNAVAILABLE), as a network failure after the server committed would."""

    def __init__(self, method: str):
        self.method = method
        self.requests: list = []

    def intercept_unary_unary(self, continuation, details, request):
        if details.method.endswith(self.method):
            self.requests.append(request)
            outcome = continuation(details, request)
            if len(self.requests) == 1:
                outcome.result()  # the server did the work
                raise _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection reset")
            return outcome
        return continuation(details, request)


def test_record_retry_after_a_lost_answer_counts_once(server, tenant):
    drop = _DropFirstResponse("/Record")
    with pc.P402Client(server.target, api_key=tenant[1], interceptors=[drop],
                       backoff=0.01) as p402:
        p402.put_budget("all", limit_nanos=USD)
        res = p402.record(model=MODEL, owners={"customer": "r"}, input_tokens=1000,
                          output_tokens=10)
        assert len(drop.requests) == 2
        assert drop.requests[0].event_id == drop.requests[1].event_id == res.event_id
        assert res.duplicate is True  # the first attempt was committed
        assert len(p402.query().items) == 1
        assert p402.list_budgets().items[0].status.committed_nanos == res.cost_nanos


def test_authorize_retry_after_a_lost_answer_holds_once(server, tenant):
    drop = _DropFirstResponse("/Authorize")
    with pc.P402Client(server.target, api_key=tenant[1], interceptors=[drop],
                       backoff=0.01) as p402:
        p402.put_budget("all", limit_nanos=USD)
        auth = p402.authorize(MODEL, owners={"customer": "r"}, input_bytes=500)
        assert len(drop.requests) == 2
        assert drop.requests[0].reservation_id == auth.reservation_id != ""
        assert p402.list_budgets().items[0].status.held_nanos == auth.estimated_cost_nanos


def test_create_key_is_never_retried(server, tenant):
    drop = _DropFirstResponse("/CreateKey")
    with pc.P402Client(server.target, api_key=tenant[1], interceptors=[drop],
                       backoff=0.01) as p402:
        with pytest.raises(pc.Unavailable):
            p402.create_key("lost", ["read"])
        assert len(drop.requests) == 1


def test_ulids_are_monotonic_across_threads():
    out: list[str] = []
    lock = threading.Lock()

    def make():
        ids = [new_ulid() for _ in range(500)]
        with lock:
            out.extend(ids)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 2000
    assert new_ulid() > max(out)


def _crockford_digits(value: int) -> str:
    """The ULID text by its definition: 26 base32 digits, most significant first."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def test_ulid_text_is_crockford_base32_of_the_128_bits():
    import random

    rng = random.Random(7)
    values = [0, 1, 31, 32, (1 << 128) - 1, 1 << 127, (1 << 80) - 1, 1 << 80,
              *(rng.getrandbits(128) for _ in range(2000))]
    for v in values:
        assert encode_ulid(v) == _crockford_digits(v), hex(v)
    ulid = encode_ulid(1_700_000_000_123 << 80 | rng.getrandbits(80))
    assert len(ulid) == 26 and ulid_time_ms(ulid) == 1_700_000_000_123
    assert set(ulid) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_new_ulid_is_its_millisecond_and_random_bits_written_out():
    """new_ulid writes a millisecond's 10 characters once: every id is still the
    Crockford text of (ms << 80 | random), across millisecond changes, a clock
    stepping back and the 2^80 borrow into the next millisecond."""
    from p402_client import ids

    base = 1_800_000_000_000
    made = []
    saved = ids._last_ms, ids._last_rand
    try:
        for ms in [base, base, base + 1, base + 5, base + 2, base + 9, base + 9]:
            made.append((new_ulid(ms), ids._last_ms, ids._last_rand))
        with ids._lock:
            ids._last_rand = (1 << 80) - 1  # the next id in this ms must borrow one
        made.append((new_ulid(base + 9), ids._last_ms, ids._last_rand))
    finally:  # later ids of this process follow the real clock again
        with ids._lock:
            ids._last_ms, ids._last_rand = saved
    for text, ms, rand in made:
        assert text == _crockford_digits(ms << 80 | rand)
    assert [ulid_time_ms(t) for t, _, _ in made] == [
        base, base, base + 1, base + 5, base + 5, base + 9, base + 9, base + 10]
    assert [t for t, _, _ in made] == sorted({t for t, _, _ in made})


def test_a_forked_child_draws_other_ids_than_its_parent():
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    new_ulid()  # the parent's generator has state to hand down
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids go to the parent, then it leaves at once
        try:
            os.write(w, " ".join(new_ulid() for _ in range(200)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read().split()
    os.waitpid(pid, 0)
    parent = [new_ulid() for _ in range(200)]
    assert len(child) == 200 and not set(child) & set(parent)
    # the random parts too, not only the times: the child's generator was reseeded
    assert not {c[10:] for c in child} & {p[10:] for p in parent}


def test_wire_enums_parse_and_number_per_enum():
    from p402_client.types import Decision, Evidence, Outcome, PrivacyMode

    # Members of different enums with the same text are equal as str: the memo of
    # parsed text and of wire numbers must keep them apart.
    for cls in (Decision, Outcome, Evidence, PrivacyMode):
        for number, member in enumerate(cls):
            for text in (member.value, member.value.lower(), member.value.replace("_", "-")):
                assert cls.parse(text) is member and type(cls.parse(text)) is cls
                assert cls.parse(text).number == number
            assert cls.parse(number) is member
    assert Decision.parse("deny").number == 3 and Outcome.parse("denied").number == 5
    assert PrivacyMode.parse("privacy_mode_metadata_only") is PrivacyMode.METADATA_ONLY
    for bad in ("nope", "nope", True, 99, 1.0, None):
        with pytest.raises(ValueError):
            Outcome.parse(bad)


def test_money_round_trips_exactly():
    for nanos in (0, 1, 999_999_999, 1_000_000_000, 123_456_789_012, -1, -1_500_000_001,
                  (1 << 63) - 1):
        money = cv.to_money(nanos)
        assert cv.from_money(money) == nanos
        assert (money.units >= 0 and money.nanos >= 0) or (money.units <= 0
                                                           and money.nanos <= 0)
    assert pc.format_usd(1_500_000) == "0.001500000"


# ---------------------------------------------------------------- async client


async def test_async_client_meters_and_reads(server, tenant):
    async with pc.AsyncP402Client(server.target, api_key=tenant[1]) as p402:
        assert (await p402.ping()).tenant == tenant[0]
        await p402.put_budget("b", limit_nanos=USD, scope={"customer": "aio"})
        auth = await p402.authorize(MODEL, owners={"customer": "aio"}, input_bytes=800,
                                    max_output_tokens=100)
        assert auth.allowed and auth.budgets[0].budget_id == "b"
        res = await p402.record(auth.reservation_id, input_tokens=200, output_tokens=50)
        again = await p402.record(auth.reservation_id, event_id=res.event_id,
                                  input_tokens=200, output_tokens=50)
        assert again.duplicate and again.cost_nanos == res.cost_nanos
        batch = await p402.record_batch([{"model": MODEL, "owners": {"customer": "aio"},
                                          "input_tokens": 7}])
        assert len(batch) == 1
        events = [e async for e in p402.iter_query(page_size=1)]
        assert len(events) == 2
        exported = [e async for e in p402.export()]
        assert [e.event_id for e in exported] == [res.event_id, batch[0].event_id]
        rows = (await p402.query(group_by=["customer"])).items
        assert rows[0].cost_nanos == res.cost_nanos + batch[0].cost_nanos
        budgets = [b async for b in p402.paginate(p402.list_budgets)]
        assert budgets[0].status.committed_nanos == rows[0].cost_nanos
        assert (await p402.get_settings()).hold_ttl_seconds > 0


async def test_async_client_maps_errors(server, tenant):
    async with pc.AsyncP402Client(server.target, api_key=tenant[1]) as p402:
        with pytest.raises(pc.InvalidArgument) as exc:
            await p402.query(page_size=-1)
        assert exc.value.field == "page_size"
        with pytest.raises(pc.NotFound):
            await p402.delete_policy_rule("missing")
    async with pc.AsyncP402Client(server.target, api_key="p402_nope") as bad:
        with pytest.raises(pc.Unauthenticated):
            await bad.ping()


def test_each_client_has_its_own_connection():
    """Two P402Client objects in one process open two TCP connections (gRPC Python
    would otherwise share one between them, and `p402 serve --workers N`, which
    spreads connections, would serve both from one worker)."""
    from concurrent import futures

    from p402.v1 import meter_pb2

    peers: list[str] = []

    def ping(request, context):
        peers.append(context.peer())
        return meter_pb2.PingResponse(tenant="t")

    handler = grpc.method_handlers_generic_handler("p402.v1.MeterService", {
        "Ping": grpc.unary_unary_rpc_method_handler(
            ping, request_deserializer=meter_pb2.PingRequest.FromString,
            response_serializer=meter_pb2.PingResponse.SerializeToString)})
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with pc.P402Client(f"127.0.0.1:{port}", api_key="p402_x") as a, \
                pc.P402Client(f"127.0.0.1:{port}", api_key="p402_x") as b:
            a.ping()
            b.ping()
            a.ping()
    finally:
        srv.stop(0)
    assert len(peers) == 3
    assert peers[0] == peers[2]  # one client keeps its connection
    assert peers[0] != peers[1]  # the other client has its own


def test_the_sdk_checks_the_string_and_time_contract_before_sending():
    """The same rules as the server (p402core.contract), refused locally naming the
    field: no round trip is made (the target does not even listen)."""
    from p402_client import P402Client
    from p402_client.errors import InvalidArgument

    with P402Client("127.0.0.1:1", api_key="p402_offline", retries=0) as c:
        cases = [
            (lambda: c.authorize("gpt-4o-mini", owners={"customer": "a\x00b"}),
             "owners.customer"),
            (lambda: c.authorize("gpt\n4o"), "model"),
            (lambda: c.authorize("gpt-4o-mini", labels={"env": "p\x85"}), "labels.env"),
            (lambda: c.authorize("gpt-4o-mini", content="a\ud800"), "content"),
            (lambda: c.record(model="m", owners={"customer": "x"}, event_id="e\x7f"),
             "event_id"),
            (lambda: c.record(model="m", owners={"customer": "x"},
                              event_time_ms=2**63 - 1), "event_time_ms"),
            (lambda: c.record(model="m" * 257, owners={"customer": "x"}), "model"),
        ]
        for call, field in cases:
            with pytest.raises(InvalidArgument) as err:
                call()
            assert err.value.field == field, (field, err.value)

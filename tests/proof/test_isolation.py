"""Tenant isolation matrix (DESIGN §9), against a real `p402 serve` process.

Two tenants, A and B, on one server. B owns a budget, a policy rule, a gateway, an
open hold, a recorded event and its keys. Every RPC of MeterService and
AdminService is called with every kind of credential of tenant A (meter, read,
admin, a revoked key, an unknown key, none), and where an RPC names a resource it
names B's (B's reservation, event id, key id, budget id, rule id, gateway id):

- the scope decides: PERMISSION_DENIED outside the RPC's scopes, UNAUTHENTICATED for
  a revoked, unknown or missing key, the RPC's own answer otherwise;
- with the right scope, B's resources are NOT_FOUND for A (or A gets its own, new
  object of that id), and B's whole state is unchanged after every call;
- reads with A's key never return anything of B.

The same holds for every remote CLI command (`p402 keys …`, `budgets …`, `events`,
`spend`, `export`, …), run as a user would, in-process against the server process.
A key revoked through the API or the CLI fails at once, on the very next call.
"""
from __future__ import annotations

import json

import grpc
import pytest
from p402.v1 import admin_pb2, common_pb2, meter_pb2

from p402_server.cli import main as cli_main
from tests.proof.harness import (
    MODEL,
    ServerProcess,
    USD,
    bearer,
    sqlite_url,
    usd,
)
from tests.proof.harness import _init_tenant  # noqa: PLC2701 - the harness's own helper

METER, READ, ADMIN = "meter", "read", "admin"
CREDS = ("meter", "read", "admin", "revoked", "unknown", "none")
ALL_SCOPES = {METER, READ, ADMIN}


class T:
    """One tenant's keys and ids."""

    def __init__(self, tenant_id: str, admin_key: str):
        self.tenant_id = tenant_id
        self.keys = {"admin": admin_key}
        self.key_ids: dict[str, str] = {}


def _stubs(channel):
    from p402.v1 import admin_pb2_grpc, meter_pb2_grpc

    return meter_pb2_grpc.MeterServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import asyncio

    tmp = tmp_path_factory.mktemp("isolation")
    url = sqlite_url(tmp / "ledger.db")
    a = T(*asyncio.run(_init_tenant(url, "tenant-a")))
    b = T(*asyncio.run(_init_tenant(url, "tenant-b")))
    srv = ServerProcess(url, log_path=tmp / "serve.log").start()
    ch = grpc.insecure_channel(srv.target)
    meter, admin = _stubs(ch)
    for t in (a, b):
        md = bearer(t.keys["admin"])
        for scope in ("meter", "read"):
            r = admin.CreateKey(admin_pb2.CreateKeyRequest(
                name=scope, scopes=[getattr(admin_pb2, f"SCOPE_{scope.upper()}")]), metadata=md)
            t.keys[scope], t.key_ids[scope] = r.api_key, r.key.key_id
        r = admin.CreateKey(admin_pb2.CreateKeyRequest(
            name="doomed", scopes=[admin_pb2.SCOPE_ADMIN]), metadata=md)
        t.keys["revoked"] = r.api_key
        meter.Ping(meter_pb2.PingRequest(), metadata=bearer(r.api_key))  # works, cached
        admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=r.key.key_id), metadata=md)
        t.key_ids["admin"] = next(k.key_id for k in admin.ListKeys(
            admin_pb2.ListKeysRequest(), metadata=md).keys if k.name == "admin (init)")
    # B's resources, which A will try to reach.
    mb = bearer(b.keys["admin"])
    for bid in ("b-secret", "shared-id"):
        admin.PutBudget(admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
            budget_id=bid, limit=usd(100 * USD), period=common_pb2.PERIOD_TOTAL,
            enforcement=common_pb2.ENFORCEMENT_HARD)), metadata=mb)
    admin.PutPolicyRule(admin_pb2.PutPolicyRuleRequest(rule=admin_pb2.PolicyRule(
        rule_id="b-rule", effect=admin_pb2.EFFECT_WARN, message="b")), metadata=mb)
    b.gateway = admin.RegisterGateway(admin_pb2.RegisterGatewayRequest(name="b-gw"),
                                      metadata=mb).gateway.gateway_id
    b.hold = meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=common_pb2.Owners(customer="b-cust"), input_bytes=400,
        max_output_tokens=50, ttl_seconds=3600), metadata=mb).reservation_id
    # A second hold of B, whose id A picks as its own caller-chosen reservation id.
    b.hold2 = meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=common_pb2.Owners(customer="b-cust"), input_bytes=400,
        max_output_tokens=50, ttl_seconds=3600), metadata=mb).reservation_id
    b.event = meter.Record(meter_pb2.RecordRequest(
        event_id="evt-b-1", model=MODEL, owners=common_pb2.Owners(customer="b-cust"),
        usage=common_pb2.Usage(input_tokens=10, output_tokens=5),
        outcome=common_pb2.OUTCOME_SUCCESS), metadata=mb).event_id
    # An event id A never uses: A must not get its receipt.
    meter.Record(meter_pb2.RecordRequest(
        event_id="evt-b-receipt", model=MODEL, owners=common_pb2.Owners(customer="b-cust"),
        usage=common_pb2.Usage(input_tokens=10, output_tokens=5)), metadata=mb)
    # A has ledger events of its own, so its reads are not trivially empty.
    meter.Record(meter_pb2.RecordRequest(
        event_id="evt-a-1", model=MODEL, owners=common_pb2.Owners(customer="a-cust"),
        usage=common_pb2.Usage(input_tokens=10, output_tokens=5),
        outcome=common_pb2.OUTCOME_SUCCESS), metadata=bearer(a.keys["admin"]))
    w = {"srv": srv, "url": url, "a": a, "b": b, "meter": meter, "admin": admin, "ch": ch}
    w["b_state"] = snapshot(w, b)
    yield w
    ch.close()
    srv.stop()


def snapshot(w, t: T) -> dict:
    """Everything tenant t can see of itself, read with its own admin key."""
    meter, admin = w["meter"], w["admin"]
    md = bearer(t.keys["admin"])
    events = meter.Query(meter_pb2.QueryRequest(page_size=1000), metadata=md).events
    settings = admin.GetSettings(admin_pb2.GetSettingsRequest(), metadata=md)
    return {
        "ping": meter.Ping(meter_pb2.PingRequest(), metadata=md).tenant,
        "keys": sorted((k.key_id, k.revoke_time_ms) for k in admin.ListKeys(
            admin_pb2.ListKeysRequest(), metadata=md).keys),
        "budgets": sorted((x.budget_id, x.limit.units, x.status.committed.units,
                           x.status.committed.nanos, x.status.held.nanos) for x in
                          admin.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=md).budgets),
        "rules": sorted(r.rule_id for r in admin.ListPolicyRules(
            admin_pb2.ListPolicyRulesRequest(), metadata=md).rules),
        "gateways": sorted((g.gateway_id, g.revoke_time_ms) for g in admin.ListGateways(
            admin_pb2.ListGatewaysRequest(), metadata=md).gateways),
        "overrides": sorted(p.model for p in admin.ListPrices(
            admin_pb2.ListPricesRequest(page_size=1000), metadata=md).prices
            if p.tenant_override),
        "settings": settings.SerializeToString(deterministic=True),
        "events": sorted((e.event_id, e.chain_hash) for e in events),
        # B's meter and read keys still work.
        "meter_ok": meter.Ping(meter_pb2.PingRequest(),
                               metadata=bearer(t.keys["meter"])).tenant,
    }


def _record(event_id: str, reservation_id: str = "") -> meter_pb2.RecordRequest:
    return meter_pb2.RecordRequest(
        event_id=event_id, reservation_id=reservation_id, model=MODEL,
        owners=common_pb2.Owners(customer="a-cust"),
        usage=common_pb2.Usage(input_tokens=3, output_tokens=2),
        outcome=common_pb2.OUTCOME_SUCCESS)


OK = grpc.StatusCode.OK
NF = grpc.StatusCode.NOT_FOUND

# (service, method, scopes, request(world) -> request or iterator, codes with the
#  right scope, check(world, response) or None). Requests aim at B's resources.
RPCS = [
    ("meter", "Authorize", {METER, ADMIN}, lambda w: meter_pb2.AuthorizeRequest(
        model=MODEL, owners=common_pb2.Owners(customer="a-cust"), input_bytes=10,
        max_output_tokens=5, ttl_seconds=1, reservation_id=w["b"].hold2), {OK},
     # A's own hold of that id: none of B's budgets, B's hold untouched (snapshot).
     lambda w, r: all(s.budget_id != "b-secret" for s in r.budgets)),
    # The same on the stream: answered in-band, A's own hold, never B's budgets.
    ("meter", "StreamAuthorize", {METER, ADMIN}, lambda w: iter([meter_pb2.AuthorizeRequest(
        model=MODEL, owners=common_pb2.Owners(customer="a-cust"), input_bytes=10,
        max_output_tokens=5, ttl_seconds=1, reservation_id=w["b"].hold2)]), {OK},
     lambda w, r: len(r) == 1 and r[0].WhichOneof("result") == "response"
     and all(s.budget_id != "b-secret" for s in r[0].response.budgets)),
    ("meter", "StreamAuthorizeBatches", {METER, ADMIN},
     lambda w: iter([meter_pb2.AuthorizeBatchRequest(requests=[meter_pb2.AuthorizeRequest(
         model=MODEL, owners=common_pb2.Owners(customer="a-cust"), input_bytes=10,
         max_output_tokens=5, ttl_seconds=1, reservation_id=w["b"].hold2)])]), {OK},
     lambda w, r: len(r) == 1 and [x.WhichOneof("result") for x in r[0].results] == [
         "response"] and all(s.budget_id != "b-secret"
                             for s in r[0].results[0].response.budgets)),
    ("meter", "Record", {METER, ADMIN}, lambda w: _record("", w["b"].hold), {NF}, None),
    # B's event id is not A's: A's own event (3 in + 2 out = 1650 nanos; B's cost
    # 4500), new on the first call, A's own duplicate on the next ones.
    ("meter", "Record", {METER, ADMIN}, lambda w: _record(w["b"].event), {OK},
     lambda w, r: r.cost.nanos == 1650 and r.cost.units == 0),
    ("meter", "RecordBatch", {METER, ADMIN}, lambda w: meter_pb2.RecordBatchRequest(
        records=[_record("", w["b"].hold)]), {NF}, None),
    ("meter", "StreamRecords", {METER, ADMIN},
     lambda w: iter([_record("", w["b"].hold)]), {NF}, None),
    ("meter", "StreamRecordBatches", {METER, ADMIN},
     lambda w: iter([meter_pb2.RecordBatchRequest(records=[_record("", w["b"].hold)])]),
     {NF}, None),
    ("meter", "Release", {METER, ADMIN},
     lambda w: meter_pb2.ReleaseRequest(reservation_id=w["b"].hold), {NF}, None),
    ("meter", "Query", {READ, ADMIN}, lambda w: meter_pb2.QueryRequest(page_size=1000), {OK},
     lambda w, r: r.events and all(e.owners.customer == "a-cust" for e in r.events)),
    ("meter", "Query", {READ, ADMIN}, lambda w: meter_pb2.QueryRequest(group_by=["customer"]),
     {OK}, lambda w, r: r.rows and all(x.group["customer"] == "a-cust" for x in r.rows)),
    ("meter", "ExportEvents", {READ, ADMIN}, lambda w: meter_pb2.ExportEventsRequest(), {OK},
     lambda w, r: r and all(e.owners.customer == "a-cust" for e in r)),
    ("meter", "Ping", {METER, READ, ADMIN}, lambda w: meter_pb2.PingRequest(), {OK},
     lambda w, r: r.tenant == w["a"].tenant_id),
    ("admin", "CreateKey", {ADMIN}, lambda w: admin_pb2.CreateKeyRequest(
        name="x", scopes=[admin_pb2.SCOPE_READ]), {OK}, None),
    ("admin", "ListKeys", {ADMIN}, lambda w: admin_pb2.ListKeysRequest(), {OK},
     lambda w, r: not {k.key_id for k in r.keys} & set(w["b"].key_ids.values())),
    ("admin", "RevokeKey", {ADMIN},
     lambda w: admin_pb2.RevokeKeyRequest(key_id=w["b"].key_ids["admin"]), {NF}, None),
    ("admin", "PutBudget", {ADMIN}, lambda w: admin_pb2.PutBudgetRequest(budget=admin_pb2.Budget(
        budget_id="shared-id", limit=usd(1), period=common_pb2.PERIOD_DAY,
        enforcement=common_pb2.ENFORCEMENT_HARD)), {OK}, None),
    ("admin", "ListBudgets", {READ, ADMIN}, lambda w: admin_pb2.ListBudgetsRequest(), {OK},
     lambda w, r: "b-secret" not in {x.budget_id for x in r.budgets}),
    ("admin", "DeleteBudget", {ADMIN},
     lambda w: admin_pb2.DeleteBudgetRequest(budget_id="b-secret"), {NF}, None),
    ("admin", "PutPolicyRule", {ADMIN}, lambda w: admin_pb2.PutPolicyRuleRequest(
        rule=admin_pb2.PolicyRule(rule_id="a-rule", effect=admin_pb2.EFFECT_WARN)), {OK}, None),
    ("admin", "ListPolicyRules", {READ, ADMIN}, lambda w: admin_pb2.ListPolicyRulesRequest(),
     {OK}, lambda w, r: "b-rule" not in {x.rule_id for x in r.rules}),
    ("admin", "DeletePolicyRule", {ADMIN},
     lambda w: admin_pb2.DeletePolicyRuleRequest(rule_id="b-rule"), {NF}, None),
    ("admin", "ImportPrices", {ADMIN}, lambda w: admin_pb2.ImportPricesRequest(
        format="litellm", data=json.dumps({"a-private-model": {
            "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
            "litellm_provider": "openai", "mode": "chat"}}).encode()), {OK}, None),
    ("admin", "ListPrices", {READ, ADMIN}, lambda w: admin_pb2.ListPricesRequest(), {OK}, None),
    ("admin", "GetSettings", {READ, ADMIN}, lambda w: admin_pb2.GetSettingsRequest(), {OK},
     lambda w, r: r.evidence_public_key and r.evidence_public_key != w["b_settings_key"]),
    ("admin", "UpdateSettings", {ADMIN}, lambda w: admin_pb2.UpdateSettingsRequest(
        settings=admin_pb2.Settings(hold_ttl_seconds=77), update_mask=["hold_ttl_seconds"]),
     {OK}, None),
    ("admin", "RegisterGateway", {ADMIN}, lambda w: admin_pb2.RegisterGatewayRequest(
        gateway_id=w["b"].gateway, name="a-gw"), {OK, grpc.StatusCode.ALREADY_EXISTS}, None),
    ("admin", "ListGateways", {READ, ADMIN}, lambda w: admin_pb2.ListGatewaysRequest(), {OK},
     None),
    ("admin", "RevokeGateway", {ADMIN},
     lambda w: admin_pb2.RevokeGatewayRequest(gateway_id=w["b"].gateway),
     {NF, OK}, None),  # OK only if RegisterGateway above gave A its own gateway of that id
    ("meter", "GetReceipt", {READ, ADMIN},
     lambda w: meter_pb2.GetReceiptRequest(event_id="evt-b-receipt"), {NF}, None),
    ("admin", "GetEvidenceKeys", {READ, ADMIN}, lambda w: admin_pb2.GetEvidenceKeysRequest(),
     {OK}, lambda w, r: r.tenant_id == w["a"].tenant_id
     and w["b_settings_key"] not in {k.public_key_hex for k in r.keys}),
    ("admin", "RotateEvidenceKey", {ADMIN}, lambda w: admin_pb2.RotateEvidenceKeyRequest(),
     {OK}, lambda w, r: r.tenant_id == w["a"].tenant_id),
    ("admin", "PutPriceBook", {ADMIN},
     lambda w: admin_pb2.PriceBook(document_json='{"markup_pct": "10"}'), {OK}, None),
    ("admin", "GetPriceBook", {READ, ADMIN}, lambda w: admin_pb2.GetPriceBookRequest(), {OK},
     None),
    ("admin", "CloseStatements", {ADMIN}, lambda w: admin_pb2.CloseStatementsRequest(
        period="2026-01", every_customer=True), {OK},
     lambda w, r: all(json.loads(x.document_json)["tenant_id"] == w["a"].tenant_id
                      for x in r.statements)),
    ("admin", "GetStatement", {READ, ADMIN}, lambda w: admin_pb2.GetStatementRequest(
        period="2026-01", customer="b-cust"), {NF}, None),
    ("admin", "ListStatements", {READ, ADMIN},
     lambda w: admin_pb2.ListStatementsRequest(every_customer=True), {OK},
     lambda w, r: "b-cust" not in {x.customer for x in r.statements}),
    ("admin", "VerifyStatement", {READ, ADMIN}, lambda w: admin_pb2.Statement(
        document_json=json.dumps({"v": 1, "typ": "p402.statement", "tenant_id": w["b"].tenant_id,
                                  "kid": "0" * 16, "sig": "00"})), {OK},
     lambda w, r: not r.ok),
]

ROWS = [pytest.param(i, cred, id=f"{svc}.{m}[{i}]-{cred}")
        for i, (svc, m, *_rest) in enumerate(RPCS) for cred in CREDS]


def test_matrix_covers_every_rpc():
    from p402.v1 import admin_pb2 as a, meter_pb2 as m

    every = {("meter", x.name) for x in m.DESCRIPTOR.services_by_name["MeterService"].methods}
    every |= {("admin", x.name) for x in a.DESCRIPTOR.services_by_name["AdminService"].methods}
    assert every == {(svc, meth) for svc, meth, *_ in RPCS}


def _call(w, svc: str, method: str, request, key: str | None):
    stub = w["meter"] if svc == "meter" else w["admin"]
    md = bearer(key) if key is not None else ()
    fn = getattr(stub, method)
    try:
        resp = fn(request, metadata=md, timeout=10)
        if not hasattr(resp, "ListFields"):  # a server stream: drain it
            resp = list(resp)
        return grpc.StatusCode.OK, resp
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


@pytest.mark.parametrize("row,cred", ROWS)
def test_rpc_scope_and_tenant_matrix(world, row, cred):
    w = world
    w.setdefault("b_settings_key", w["b_state"] and _settings_key(w, w["b"]))
    svc, method, scopes, build, ok_codes, check = RPCS[row]
    key = {"unknown": "p402_" + "Z" * 40, "none": None}.get(cred, w["a"].keys.get(cred))
    code, resp = _call(w, svc, method, build(w), key)
    if cred in ("revoked", "unknown", "none"):
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, resp)
    elif cred not in scopes:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, resp)
    else:
        assert code in ok_codes, (code, resp)
        if code == OK and check is not None:
            assert check(w, resp), resp
    # Whatever A did, B is exactly as it was.
    assert snapshot(w, w["b"]) == w["b_state"]


def _settings_key(w, t: T) -> str:
    return w["admin"].GetSettings(admin_pb2.GetSettingsRequest(),
                                  metadata=bearer(t.keys["admin"])).evidence_public_key


def test_b_hold_still_settles_for_b(world):
    """B's hold, which A tried to record and release, is still B's to release."""
    w = world
    r = w["meter"].Release(meter_pb2.ReleaseRequest(reservation_id=w["b"].hold),
                           metadata=bearer(w["b"].keys["meter"]))
    assert r.event_id
    w["b_state"] = snapshot(w, w["b"])


def test_revoked_key_fails_at_once(world):
    w = world
    meter, admin = w["meter"], w["admin"]
    md = bearer(w["a"].keys["admin"])
    for _ in range(3):
        r = admin.CreateKey(admin_pb2.CreateKeyRequest(name="short", scopes=[admin_pb2.SCOPE_METER]),
                            metadata=md)
        assert meter.Ping(meter_pb2.PingRequest(), metadata=bearer(r.api_key)).tenant
        admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=r.key.key_id), metadata=md)
        with pytest.raises(grpc.RpcError) as exc:  # the very next call
            meter.Authorize(meter_pb2.AuthorizeRequest(model=MODEL), metadata=bearer(r.api_key))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------- the CLI


def _cli(capsys, monkeypatch, w, cred: str, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("P402_TARGET", w["srv"].target)
    monkeypatch.setenv("P402_API_KEY", w["a"].keys[cred])
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _cli_rows(tmp):
    rules = tmp / "rules.json"
    rules.write_text(json.dumps({"rules": [{"rule_id": "a-loaded", "effect": "warn"}]}))
    prices = tmp / "prices.json"
    prices.write_text(json.dumps({"a-cli-model": {"input_cost_per_token": 1e-6,
                                                  "output_cost_per_token": 2e-6,
                                                  "litellm_provider": "openai"}}))
    out = tmp / "export.jsonl"
    return [
        # (argv, scopes, exit code with the scope, text that must not appear)
        (["ping"], ALL_SCOPES, 0),
        (["keys", "create", "--scope", "read"], {ADMIN}, 0),
        (["keys", "list"], {ADMIN}, 0),
        (["keys", "revoke", "@b-admin"], {ADMIN}, 1),
        (["budgets", "set", "shared-id", "--limit", "1.00"], {ADMIN}, 0),
        (["budgets", "list"], {READ, ADMIN}, 0),
        (["budgets", "delete", "b-secret"], {ADMIN}, 1),
        (["policies", "set", "a-cli", "--effect", "warn"], {ADMIN}, 0),
        (["policies", "list"], {READ, ADMIN}, 0),
        (["policies", "delete", "b-rule"], {ADMIN}, 1),
        (["policies", "load", str(rules)], {ADMIN}, 0),
        (["prices", "import", str(prices)], {ADMIN}, 0),
        (["prices", "list", "--model", "a-cli"], {READ, ADMIN}, 0),
        (["events", "--since", "7d"], {READ, ADMIN}, 0),
        (["spend", "--since", "7d", "--by", "customer"], {READ, ADMIN}, 0),
        (["export", "--since", "7d", "--format", "jsonl", "-o", str(out)], {READ, ADMIN}, 0),
        (["export", "--since", "7d", "--format", "csv"], {READ, ADMIN}, 0),
        (["settings", "get"], {READ, ADMIN}, 0),
        (["settings", "set", "--hold-ttl", "60"], {ADMIN}, 0),
        (["keys", "evidence"], {READ, ADMIN}, 0),
        (["receipts", "get", "evt-b-receipt"], {READ, ADMIN}, 1),
        (["pricebook", "show"], {READ, ADMIN}, 0),
        (["statements", "close", "--period", "2026-01"], {ADMIN}, 0),
        (["billing", "export", "--period", "2026-01", "--format", "lago"], {READ, ADMIN}, 0),
    ]


REMOTE_CLI = {"ping", "keys", "budgets", "policies", "prices", "events", "spend", "export",
              "settings", "receipts", "pricebook", "statements", "billing"}


def test_cli_rows_cover_every_remote_command(tmp_path):
    covered = {row[0][0] for row in _cli_rows(tmp_path)}
    assert covered == REMOTE_CLI
    from p402_server.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command" or
               getattr(a, "choices", None) and "serve" in (a.choices or {}))
    local = {"serve", "proxy", "init", "verify", "contents", "bench", "demo"}
    assert set(sub.choices) == REMOTE_CLI | local, sorted(set(sub.choices) ^ (REMOTE_CLI | local))


@pytest.mark.parametrize("cred", ["meter", "read", "admin"])
def test_cli_scope_and_tenant_matrix(world, cred, capsys, monkeypatch, tmp_path):
    w = world
    b = w["b"]
    for argv, scopes, code_with_scope in _cli_rows(tmp_path):
        argv = [b.key_ids["admin"] if x == "@b-admin" else x for x in argv]
        code, out, err = _cli(capsys, monkeypatch, w, cred, *argv)
        text = out + err
        if cred in scopes:
            assert code == code_with_scope, (argv, code, err)
            if code_with_scope == 1:
                assert "NOT_FOUND" in err, (argv, err)
        else:
            assert code == 1 and "PERMISSION_DENIED" in err, (argv, cred, code, err)
        # Nothing of B ever shows up in A's output (B's events are customer "b-cust";
        # the id "evt-b-1" A has reused for an event of its own in the RPC matrix).
        for secret in (b.tenant_id, b.key_ids["admin"], "b-secret", "b-rule",
                       b.gateway, "b-cust"):
            if secret in argv:
                continue  # echoed back in a NOT_FOUND message: it was A's input
            assert secret not in text, (argv, secret)
        if argv[0] == "export" and "-o" in argv and code == 0:
            body = open(argv[argv.index("-o") + 1]).read()
            assert "a-cust" in body and "b-cust" not in body
        assert snapshot(w, b) == w["b_state"], argv


def test_cli_revoke_takes_effect_at_once(world, capsys, monkeypatch):
    w = world
    code, out, _ = _cli(capsys, monkeypatch, w, "admin", "keys", "create", "--scope", "meter",
                        "--json")
    assert code == 0
    doc = json.loads(out)
    new_key = doc.get("api_key")
    key_id = (doc.get("key") or {}).get("key_id") or doc.get("key_id")
    assert new_key and key_id, doc
    assert w["meter"].Ping(meter_pb2.PingRequest(), metadata=bearer(new_key)).tenant
    code, _, err = _cli(capsys, monkeypatch, w, "admin", "keys", "revoke", key_id)
    assert code == 0, err
    with pytest.raises(grpc.RpcError) as exc:
        w["meter"].Ping(meter_pb2.PingRequest(), metadata=bearer(new_key))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED

"""Authentication, scopes and tenant isolation, over the wire; the key cache in memory."""
from __future__ import annotations

import grpc
import pytest

from p402_server.api.auth import ADMIN, METER, KeyCache
from p402_server.wire.errors import ServiceError
from service_harness import (  # noqa: F401 - fixtures
    admin_pb2,
    bearer,
    error_info,
    meter_pb2,
    owners,
    svc,
    usd,
)

MODEL = "gpt-4o-mini"


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_missing_and_unknown_keys_are_unauthenticated(svc):
    for md in (None, (("authorization", "Basic abc"),), bearer("p402_" + "x" * 40),
               bearer("")):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await svc.meter.Ping(meter_pb2.PingRequest(), metadata=md)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = error_info(exc.value)
        assert info.reason in ("API_KEY_MISSING", "API_KEY_INVALID")
        assert info.metadata["field"] == "authorization"


async def test_revoked_key_fails_on_the_next_call(svc):
    meter_key = await svc.key("meter")
    assert (await svc.meter.Ping(meter_pb2.PingRequest(), metadata=bearer(meter_key))).tenant
    keys = await svc.admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=svc.auth)
    key_id = next(k.key_id for k in keys.keys if meter_key.startswith(k.prefix)
                  and k.scopes == [admin_pb2.SCOPE_METER])
    revoked = await svc.admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=key_id),
                                        metadata=svc.auth)
    assert revoked.key.revoke_time_ms > 0
    assert await code_of(svc.meter.Ping(meter_pb2.PingRequest(), metadata=bearer(meter_key))) \
        == grpc.StatusCode.UNAUTHENTICATED


async def test_key_is_shown_once_and_listed_by_prefix_only(svc):
    created = await svc.admin.CreateKey(admin_pb2.CreateKeyRequest(
        name="gateway", scopes=[admin_pb2.SCOPE_METER, admin_pb2.SCOPE_READ]),
        metadata=svc.auth)
    assert created.api_key.startswith("p402_") and len(created.api_key) >= 37
    listed = await svc.admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=svc.auth)
    mine = next(k for k in listed.keys if k.key_id == created.key.key_id)
    assert created.api_key.startswith(mine.prefix) and mine.prefix != created.api_key
    assert list(mine.scopes) == [admin_pb2.SCOPE_METER, admin_pb2.SCOPE_READ]
    assert created.api_key not in str(listed)


# (call, meter, read, admin): may a key with only that scope make the call?
MATRIX = [
    ("Ping", True, True, True),
    ("Authorize", True, False, True),
    ("Record", True, False, True),
    ("Release", True, False, True),
    ("Query", False, True, True),
    ("ListBudgets", False, True, True),
    ("GetSettings", False, True, True),
    ("PutBudget", False, False, True),
    ("CreateKey", False, False, True),
    ("ListKeys", False, False, True),
]


def _call(svc, name: str, md):
    m, a = svc.meter, svc.admin
    return {
        "Ping": lambda: m.Ping(meter_pb2.PingRequest(), metadata=md),
        "Authorize": lambda: m.Authorize(meter_pb2.AuthorizeRequest(
            model=MODEL, owners=owners(customer="c"), input_bytes=1), metadata=md),
        "Record": lambda: m.Record(meter_pb2.RecordRequest(
            model=MODEL, owners=owners(customer="c")), metadata=md),
        "Release": lambda: m.Release(meter_pb2.ReleaseRequest(reservation_id="r"), metadata=md),
        "Query": lambda: m.Query(meter_pb2.QueryRequest(), metadata=md),
        "ListBudgets": lambda: a.ListBudgets(admin_pb2.ListBudgetsRequest(), metadata=md),
        "GetSettings": lambda: a.GetSettings(admin_pb2.GetSettingsRequest(), metadata=md),
        "PutBudget": lambda: a.PutBudget(admin_pb2.PutBudgetRequest(
            budget=admin_pb2.Budget(budget_id="b", limit=usd(1))), metadata=md),
        "CreateKey": lambda: a.CreateKey(admin_pb2.CreateKeyRequest(
            scopes=[admin_pb2.SCOPE_READ]), metadata=md),
        "ListKeys": lambda: a.ListKeys(admin_pb2.ListKeysRequest(), metadata=md),
    }[name]()


async def test_scope_matrix(svc):
    keys = {scope: bearer(await svc.key(scope)) for scope in ("meter", "read", "admin")}
    for name, *allowed in MATRIX:
        for scope, ok in zip(("meter", "read", "admin"), allowed):
            code = await code_of(_call(svc, name, keys[scope]))
            if ok:
                # Allowed through auth; Release of an unknown id is NOT_FOUND, fine.
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (name, scope)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (name, scope, code)


async def test_permission_denied_names_the_scope(svc):
    read_key = await svc.key("read")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _call(svc, "Authorize", bearer(read_key))
    info = error_info(exc.value)
    assert (info.reason, info.metadata["required_scope"]) == ("SCOPE_MISSING", "meter")


async def test_tenant_isolation(svc):
    other_id, other_key = await svc.tenant("globex")
    b = bearer(other_key)
    # Tenant A records and holds; tenant B can neither see nor spend nor revoke.
    await svc.meter.Record(meter_pb2.RecordRequest(
        event_id="a-1", model=MODEL, owners=owners(customer="acme")), metadata=svc.auth)
    hold = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=100), metadata=svc.auth)
    assert (await svc.meter.Ping(meter_pb2.PingRequest(), metadata=b)).tenant == other_id
    assert list((await svc.meter.Query(meter_pb2.QueryRequest(), metadata=b)).events) == []
    assert await code_of(svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=hold.reservation_id), metadata=b)) == grpc.StatusCode.NOT_FOUND
    assert await code_of(svc.meter.Release(meter_pb2.ReleaseRequest(
        reservation_id=hold.reservation_id), metadata=b)) == grpc.StatusCode.NOT_FOUND
    a_keys = await svc.admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=svc.auth)
    assert await code_of(svc.admin.RevokeKey(admin_pb2.RevokeKeyRequest(
        key_id=a_keys.keys[0].key_id), metadata=b)) == grpc.StatusCode.NOT_FOUND
    # Same event id in tenant B is B's own event, not a duplicate of A's.
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        event_id="a-1", model=MODEL, owners=owners(customer="acme")), metadata=b)
    assert not r.duplicate
    # A's key still works and A's hold is still A's.
    assert (await svc.meter.Ping(meter_pb2.PingRequest(), metadata=svc.auth)).tenant \
        == svc.tenant_id
    assert not (await svc.meter.Record(meter_pb2.RecordRequest(
        reservation_id=hold.reservation_id), metadata=svc.auth)).duplicate


# --- KeyCache in memory ---------------------------------------------------------------

class FakeStore:
    def __init__(self, infos):
        self.infos = infos
        self.reads = 0

    async def find_key(self, plaintext):
        self.reads += 1
        return self.infos.get(plaintext)


class Ctx:
    def __init__(self, key):
        self.md = (("authorization", f"Bearer {key}"),)

    def invocation_metadata(self):
        return self.md


def _info(key_id="k1", scopes=("meter",), revoked=None):
    from p402_server.ledger import KeyInfo

    return KeyInfo(key_id, "t1", "n", "p402_abc", frozenset(scopes), 0, revoked)


async def test_cache_hits_do_not_read_the_store_and_revalidate_after_the_period():
    now = [0.0]
    store = FakeStore({"p402_good": _info()})
    cache = KeyCache(store, revalidate_seconds=5, clock=lambda: now[0])
    for _ in range(100):
        assert (await cache.authenticate(Ctx("p402_good"), METER, "Ping")).key_id == "k1"
    assert store.reads == 1
    store.infos["p402_good"] = None  # revoked by another process
    now[0] = 4.9
    await cache.authenticate(Ctx("p402_good"), METER, "Ping")
    now[0] = 5.1
    with pytest.raises(ServiceError) as exc:
        await cache.authenticate(Ctx("p402_good"), METER, "Ping")
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED and store.reads == 2


async def test_cache_revoke_applies_at_once_and_unknown_keys_are_cached_briefly():
    now = [0.0]
    store = FakeStore({"p402_good": _info()})
    cache = KeyCache(store, negative_seconds=1, clock=lambda: now[0])
    await cache.authenticate(Ctx("p402_good"), METER, "Ping")
    cache.revoke("k1")
    with pytest.raises(ServiceError):
        await cache.authenticate(Ctx("p402_good"), METER, "Ping")
    reads = store.reads
    for _ in range(10):
        with pytest.raises(ServiceError):
            await cache.authenticate(Ctx("p402_bad"), METER, "Ping")
    assert store.reads == reads + 1
    with pytest.raises(ServiceError) as exc:
        await KeyCache(FakeStore({"p402_m": _info()})).authenticate(Ctx("p402_m"), ADMIN, "X")
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_cache_is_bounded():
    store = FakeStore({f"p402_{i}": _info(f"k{i}") for i in range(50)})
    cache = KeyCache(store, max_entries=10)
    for i in range(50):
        await cache.authenticate(Ctx(f"p402_{i}"), METER, "Ping")
    assert len(cache._entries) == 10

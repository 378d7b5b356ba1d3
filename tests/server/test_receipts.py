"""Signed receipts, on SQLite and PostgreSQL: a Record asks for one (or GetReceipt
gives it later), anyone verifies it with the tenant's public key set alone, every
field is covered by the signature, rotation keeps old receipts verifiable, and a
receipt never carries content in any privacy mode."""
from __future__ import annotations

import json

import grpc
import pytest
from p402.v1 import admin_pb2, common_pb2, meter_pb2

from p402_server.ledger import receipts
from tests.server.service_harness import nanos, owners, svc_any  # noqa: F401

PROMPT = "the secret plan: ostrich-lantern-9917"
RESPONSE = "approved by marmot-quill-2208"


async def _keys(svc) -> dict:
    resp = await svc.admin.GetEvidenceKeys(admin_pb2.GetEvidenceKeysRequest(),
                                           metadata=svc.auth)
    data = json.loads(resp.key_set_json)
    assert [k.key_id for k in resp.keys] == [k["kid"] for k in data["keys"]]
    return data


async def _record(svc, **kw):
    return await svc.meter.Record(meter_pb2.RecordRequest(
        model="gpt-4o-mini", owners=owners(customer="acme", feature="chat"),
        labels={"env": "prod"}, usage=common_pb2.Usage(input_tokens=1200, output_tokens=300),
        **kw), metadata=svc.auth)


async def test_a_receipt_verifies_with_the_public_keys_and_matches_the_ledger(svc_any):
    svc = svc_any
    r = await _record(svc, want_receipt=True)
    assert r.receipt
    keys = receipts.keys_from_set(await _keys(svc))
    ok, why, doc = receipts.verify(r.receipt, keys)
    assert ok, why
    ev = await svc.store.get_event(svc.tenant_id, r.event_id)
    assert doc["event_id"] == r.event_id and doc["cost_nanos"] == nanos(r.cost) == ev.cost_nanos
    assert doc["chain_index"] == ev.chain_index and doc["chain_hash"] == ev.chain_hash
    assert doc["owners"] == {"customer": "acme", "feature": "chat"}
    assert doc["usage"] == {"input_tokens": 1200, "output_tokens": 300}
    assert doc["evidence"] == "REPORTED" and doc["catalog_version"] == r.catalog_version
    # GetReceipt gives the same receipt (Ed25519 is deterministic)
    got = await svc.meter.GetReceipt(meter_pb2.GetReceiptRequest(event_id=r.event_id),
                                     metadata=svc.auth)
    assert got.receipt == r.receipt
    # off by default: the hot path does not pay for it
    assert (await _record(svc)).receipt == ""


async def test_every_field_is_covered_by_the_signature(svc_any):
    svc = svc_any
    r = await _record(svc, want_receipt=True)
    keys = receipts.keys_from_set(await _keys(svc))
    doc = json.loads(r.receipt)
    changed = {"event_id": "evt_forged", "cost_nanos": 1, "tenant_id": "t_other",
               "kind": "released", "event_time_ms": 1, "owners": {"customer": "globex"},
               "model": "gpt-3.5-turbo", "provider": "x", "catalog_version": "v0",
               "usage": {"input_tokens": 1}, "currency": "EUR", "evidence": "ATTESTED",
               "chain_index": 99, "chain_hash": "0" * 64}
    assert set(changed) | {"v", "typ", "kid", "sig"} == set(doc)
    for field, value in changed.items():
        forged = {**doc, field: value}
        ok, why, _ = receipts.verify(json.dumps(forged), keys)
        assert not ok and "altered" in why, field
    for bad, reason in (({**doc, "extra": 1}, "unknown field"),
                        ({**doc, "kid": "0" * 16}, "unknown key"),
                        ({**doc, "v": 2}, "version 1")):
        ok, why, _ = receipts.verify(json.dumps(bad), keys)
        assert not ok and reason in why
    assert not receipts.verify("not json", keys)[0]


async def test_rotation_keeps_old_receipts_verifiable(svc_any):
    svc = svc_any
    before = await _keys(svc)
    old = (await _record(svc, want_receipt=True)).receipt
    rotated = await svc.admin.RotateEvidenceKey(admin_pb2.RotateEvidenceKeyRequest(),
                                                metadata=svc.auth)
    assert [k.status for k in rotated.keys] == ["active", "retired"]
    assert rotated.keys[1].key_id == before["keys"][0]["kid"]
    assert rotated.keys[1].retired_time_ms > 0
    new = (await _record(svc, want_receipt=True)).receipt
    after = receipts.keys_from_set(json.loads(rotated.key_set_json))
    assert json.loads(new)["kid"] != json.loads(old)["kid"]
    assert receipts.verify(old, after)[0] and receipts.verify(new, after)[0]
    # the set published before the rotation does not know the new key
    ok, why, _ = receipts.verify(new, receipts.keys_from_set(before))
    assert not ok and "unknown key" in why
    # and survives a restart (kept in the tenant's settings)
    await svc.restart()
    keys = await _keys(svc)
    assert [k["status"] for k in keys["keys"]] == ["active", "retired"]
    # a process that did not commit the event signs it from the store, with the key
    # active now: the same document, and it verifies
    doc = json.loads(old)
    again = (await svc.meter.GetReceipt(meter_pb2.GetReceiptRequest(
        event_id=doc["event_id"]), metadata=svc.auth)).receipt
    ok, why, redone = receipts.verify(again, receipts.keys_from_set(keys))
    assert ok, why
    assert {k: v for k, v in redone.items() if k not in ("kid", "sig")} == \
        {k: v for k, v in doc.items() if k not in ("kid", "sig")}
    assert redone["kid"] == keys["keys"][0]["kid"] != doc["kid"]


@pytest.mark.parametrize("mode", [1, 2, 3, 5])
async def test_a_receipt_never_carries_content(svc_any, mode):
    svc = svc_any
    await svc.admin.UpdateSettings(admin_pb2.UpdateSettingsRequest(
        settings=admin_pb2.Settings(allowed_privacy_modes=[1, 2, 3, 4, 5]),
        update_mask=["allowed_privacy_modes"]), metadata=svc.auth)
    r = await _record(svc, want_receipt=True, privacy_mode=mode, prompt=PROMPT,
                      response=RESPONSE)
    raw = r.receipt.encode()
    for needle in (PROMPT, RESPONSE, "ostrich", "marmot", "prod"):
        assert needle.encode() not in raw
    assert receipts.verify(r.receipt, receipts.keys_from_set(await _keys(svc)))[0]


async def test_batches_and_refusals(svc_any):
    svc = svc_any
    batch = await svc.meter.RecordBatch(meter_pb2.RecordBatchRequest(records=[
        meter_pb2.RecordRequest(model="gpt-4o-mini", owners=owners(customer="acme"),
                                usage=common_pb2.Usage(input_tokens=10), want_receipt=True),
        meter_pb2.RecordRequest(model="gpt-4o-mini", owners=owners(customer="acme"),
                                usage=common_pb2.Usage(input_tokens=20))]), metadata=svc.auth)
    assert batch.results[0].receipt and not batch.results[1].receipt
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.meter.GetReceipt(meter_pb2.GetReceiptRequest(event_id="evt_nope"),
                                   metadata=svc.auth)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # another tenant cannot get this tenant's receipt
    _tid, other_key = await svc.tenant("globex-co")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.meter.GetReceipt(meter_pb2.GetReceiptRequest(
            event_id=batch.results[0].event_id), metadata=(("authorization",
                                                            f"Bearer {other_key}"),))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

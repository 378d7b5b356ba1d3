"""RecordRequest.usage_estimated at the service: the caller's estimate, not the
provider's report, is committed with evidence ESTIMATED — on Record, RecordBatch and
StreamRecords, and whatever fingerprint or signature would otherwise raise it."""
from __future__ import annotations

from p402_server.privacy.signing import signature_metadata
from tests.server.service_harness import (admin_pb2, common_pb2, meter_pb2, owners,  # noqa: F401
                                          svc)

MODEL = "gpt-4o-mini"
M = common_pb2


async def _authorized(svc, **kw) -> str:
    a = await svc.meter.Authorize(meter_pb2.AuthorizeRequest(
        model=MODEL, owners=owners(customer="acme"), input_bytes=4000,
        max_output_tokens=100, **kw), metadata=svc.auth)
    assert a.decision == M.DECISION_ALLOW, a
    return a.reservation_id


def _record(rid: str, estimated: bool, **kw) -> meter_pb2.RecordRequest:
    return meter_pb2.RecordRequest(reservation_id=rid, usage=M.Usage(input_tokens=900),
                                   outcome=M.OUTCOME_TIMEOUT, usage_estimated=estimated,
                                   **kw)


async def _ledger_evidence(svc) -> dict[str, int]:
    resp = await svc.meter.Query(meter_pb2.QueryRequest(page_size=100), metadata=svc.auth)
    return {e.event_id: e.evidence for e in resp.events}


async def test_record_flagged_estimated_is_estimated_else_reported(svc):
    est = await svc.meter.Record(_record(await _authorized(svc), True), metadata=svc.auth)
    rep = await svc.meter.Record(_record(await _authorized(svc), False), metadata=svc.auth)
    assert est.evidence == M.EVIDENCE_ESTIMATED
    assert rep.evidence == M.EVIDENCE_REPORTED
    # Same usage, same price: the flag changes the evidence, never the money.
    assert est.cost.nanos == rep.cost.nanos and est.cost.units == rep.cost.units
    ledger = await _ledger_evidence(svc)
    assert ledger[est.event_id] == M.EVIDENCE_ESTIMATED
    assert ledger[rep.event_id] == M.EVIDENCE_REPORTED
    # A retry answers the first result, flag and all.
    again = await svc.meter.Record(_record("", True, event_id=est.event_id, model=MODEL),
                                   metadata=svc.auth)
    assert again.duplicate and again.evidence == M.EVIDENCE_ESTIMATED


async def test_batch_and_stream_honour_the_flag_per_record(svc):
    batch = meter_pb2.RecordBatchRequest(records=[
        _record(await _authorized(svc), True), _record(await _authorized(svc), False)])
    resp = await svc.meter.RecordBatch(batch, metadata=svc.auth)
    assert [r.evidence for r in resp.results] == [M.EVIDENCE_ESTIMATED,
                                                  M.EVIDENCE_REPORTED]
    reqs = [_record(await _authorized(svc), flag) for flag in (False, True)]

    async def gen():
        for r in reqs:
            yield r

    got = [r.evidence async for r in svc.meter.StreamRecords(gen(), metadata=svc.auth)]
    assert got == [M.EVIDENCE_REPORTED, M.EVIDENCE_ESTIMATED]


async def test_an_estimate_stays_estimated_when_fingerprinted(svc):
    mode = M.PRIVACY_MODE_FINGERPRINT_ONLY
    prompt = "tally the quarterly invoices"
    rid = await _authorized(svc, content=prompt, privacy_mode=mode)
    est = await svc.meter.Record(_record(rid, True, privacy_mode=mode, prompt=prompt),
                                 metadata=svc.auth)
    rid = await _authorized(svc, content=prompt + "!", privacy_mode=mode)
    rep = await svc.meter.Record(_record(rid, False, privacy_mode=mode,
                                         prompt=prompt + "!"), metadata=svc.auth)
    assert rep.evidence == M.EVIDENCE_FINGERPRINTED
    assert est.evidence == M.EVIDENCE_ESTIMATED


async def test_an_estimate_stays_estimated_when_signed(svc):
    r = await svc.admin.RegisterGateway(admin_pb2.RegisterGatewayRequest(name="edge"),
                                        metadata=svc.auth)
    gid, secret = r.gateway.gateway_id, r.secret
    mode = M.PRIVACY_MODE_PRIVATE_GATEWAY
    for flag, want in ((False, M.EVIDENCE_ATTESTED), (True, M.EVIDENCE_ESTIMATED)):
        req = _record(await _authorized(svc, privacy_mode=mode), flag, privacy_mode=mode)
        resp = await svc.meter.Record(
            req, metadata=svc.auth + signature_metadata(gid, secret, "Record", req))
        assert resp.evidence == want, flag

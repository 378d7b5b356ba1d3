"""Signed reports from the SDK (p402_client.signing) against a real server: the
client's signature is the server's byte for byte; signed Records, RecordBatches,
meter() and the Recorder are ATTESTED; a wrong secret, a revoked gateway and an
unsigned private_gateway report are refused with the clear status and leave
nothing in the ledger; every retry is signed afresh."""
from __future__ import annotations

import base64

import grpc
import pytest

import p402_client as pc
from p402.v1 import meter_pb2
from p402_client.signing import GatewaySigner
from p402_server.privacy import signing as server_signing

MODEL = "gpt-4o-mini"
OWNERS = {"customer": "acme", "department": "finance"}


@pytest.fixture
def gateway(p402):
    """(gateway_id, secret hex) of a gateway registered on the test's tenant, whose
    default privacy mode is private_gateway (unsigned reports are refused)."""
    p402.update_settings(default_privacy_mode="PRIVATE_GATEWAY")
    reg = p402.register_gateway(name="finance-edge")
    assert reg.gateway.active and reg.gateway.gateway_id.startswith("gw_")
    assert len(bytes.fromhex(reg.secret)) == 32
    return reg.gateway.gateway_id, reg.secret


@pytest.fixture
def signed(server, tenant, gateway):
    gid, secret = gateway
    with pc.P402Client(server.target, api_key=tenant[1], timeout=10.0,
                       gateway_id=gid, gateway_secret=secret) as client:
        yield client


def _events(p402) -> list:
    return list(p402.iter_query())


# ---------------------------------------------------------------- the scheme


@pytest.mark.parametrize("method", ["Record", "RecordBatch"])
def test_client_signature_is_the_servers(method):
    secret = bytes(range(32))
    rec = meter_pb2.RecordRequest(event_id="01J00000000000000000000000", model=MODEL,
                                  labels={"b": "2", "a": "1"}, input_bytes=7)
    req = rec if method == "Record" else meter_pb2.RecordBatchRequest(records=[rec, rec])
    ours = GatewaySigner("gw_1", secret.hex()).metadata(method, req, timestamp=1700000000,
                                                         nonce="n" * 24)
    theirs = server_signing.signature_metadata("gw_1", secret, method, req,
                                               timestamp=1700000000, nonce="n" * 24)
    assert ours == theirs
    # And the server's verifier accepts it (the nonce then counts as used).
    headers = dict(ours)
    got = server_signing.verify_call(
        headers, method, req, tenant_id="t", skew_seconds=300, now=1700000010,
        gateways={"gw_1": {"secret": "raw:" + base64.b64encode(secret).decode()}},
        nonces=server_signing.NonceCache())
    assert got == "gw_1"


def test_each_signature_has_a_fresh_nonce_and_the_clock_time():
    signer = GatewaySigner("gw_1", "ab" * 32, clock=lambda: 1234.9)
    req = meter_pb2.RecordRequest(model=MODEL)
    a, b = dict(signer.metadata("Record", req)), dict(signer.metadata("Record", req))
    assert a["x-p402-timestamp"] == "1234"
    assert a["x-p402-nonce"] != b["x-p402-nonce"]
    assert a["x-p402-signature"] != b["x-p402-signature"]
    assert "ab" * 32 not in repr(signer)


@pytest.mark.parametrize("kw, field", [
    ({"gateway_id": "gw_1"}, "gateway_secret"),
    ({"gateway_id": "gw_1", "gateway_secret": "not hex"}, "gateway_secret"),
    ({"gateway_id": "gw_1", "gateway_secret": "abcd"}, "gateway_secret"),
    ({"gateway_secret": "ab" * 32}, "gateway_id"),
    ({"signer": GatewaySigner("gw_1", "ab" * 32), "gateway_id": "gw_2"}, "signer"),
    ({"signer": "gw_1"}, "signer"),
])
def test_bad_signing_configuration_names_the_field(kw, field):
    with pytest.raises(pc.InvalidArgument) as exc:
        pc.P402Client("127.0.0.1:1", api_key="p402_x", **kw)
    assert exc.value.field == field


def test_only_record_calls_are_signed():
    with pytest.raises(pc.InvalidArgument) as exc:
        GatewaySigner("gw_1", "ab" * 32).metadata("Authorize", meter_pb2.RecordRequest())
    assert exc.value.field == "method"


# ---------------------------------------------------------------- against the server


def test_signed_record_is_attested(signed, p402):
    auth = signed.authorize(MODEL, owners=OWNERS, input_bytes=2000, max_output_tokens=100)
    assert auth.allowed
    res = signed.record(auth.reservation_id, input_tokens=480, output_tokens=90)
    assert res.evidence is pc.Evidence.ATTESTED
    [ev] = _events(p402)
    assert ev.event_id == res.event_id and ev.evidence is pc.Evidence.ATTESTED
    assert ev.privacy_mode is pc.PrivacyMode.PRIVATE_GATEWAY


def test_signed_batch_meter_and_recorder_are_attested(signed, p402):
    rids = [signed.authorize(MODEL, owners=OWNERS, max_output_tokens=50).reservation_id
            for _ in range(2)]
    results = signed.record_batch([{"reservation_id": r, "input_tokens": 10,
                                    "output_tokens": 5} for r in rids])
    assert [r.evidence for r in results] == [pc.Evidence.ATTESTED] * 2
    with signed.meter(MODEL, owners=OWNERS, max_output_tokens=50) as m:
        m.set_usage(input_tokens=30, output_tokens=12)
    assert m.result.evidence is pc.Evidence.ATTESTED
    errors: list = []
    with pc.Recorder(signed, batch_size=8, register_atexit=False,
                     on_error=lambda *a: errors.append(a)) as rec:
        queued = [rec.record(model=MODEL, owners=OWNERS, input_tokens=11 + i)
                  for i in range(3)]
        assert rec.flush(10.0)
    assert errors == []
    by_id = {e.event_id: e for e in _events(p402)}
    assert len(by_id) == 6 and set(queued) <= set(by_id)
    assert {e.evidence for e in by_id.values()} == {pc.Evidence.ATTESTED}


def test_wrong_secret_is_refused_and_leaves_nothing(server, tenant, gateway, p402):
    gid, _secret = gateway
    with pc.P402Client(server.target, api_key=tenant[1], timeout=10.0,
                       gateway_id=gid, gateway_secret="00" * 32) as forged:
        auth = forged.authorize(MODEL, owners=OWNERS, max_output_tokens=50)
        with pytest.raises(pc.Unauthenticated) as exc:
            forged.record(auth.reservation_id, input_tokens=10, output_tokens=5)
    assert exc.value.reason == "SIGNATURE_INVALID"
    assert exc.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not match" in exc.value.message
    assert _events(p402) == []
    # The reservation is still open: the right gateway can settle it.
    with pc.P402Client(server.target, api_key=tenant[1], timeout=10.0,
                       gateway_id=gid, gateway_secret=_secret) as right:
        res = right.record(auth.reservation_id, input_tokens=10, output_tokens=5)
    assert res.evidence is pc.Evidence.ATTESTED


def test_unsigned_and_revoked_are_refused(server, tenant, gateway, p402, signed):
    auth = p402.authorize(MODEL, owners=OWNERS, max_output_tokens=50)
    with pytest.raises(pc.Unauthenticated) as exc:
        p402.record(auth.reservation_id, input_tokens=10)
    assert exc.value.reason == "SIGNATURE_MISSING"
    gone = p402.revoke_gateway(gateway[0])
    assert not gone.active
    assert [g.active for g in p402.list_gateways().items] == [False]
    with pytest.raises(pc.Unauthenticated) as exc:
        signed.record(auth.reservation_id, input_tokens=10)
    assert exc.value.reason == "GATEWAY_UNKNOWN"
    assert _events(p402) == []


async def test_async_client_signs_too(server, tenant, gateway):
    gid, secret = gateway
    async with pc.AsyncP402Client(server.target, api_key=tenant[1], timeout=10.0,
                                  signer=GatewaySigner(gid, secret)) as p402:
        async with p402.meter(MODEL, owners=OWNERS, max_output_tokens=50) as m:
            m.set_usage(input_tokens=25, output_tokens=10)
        assert m.result.evidence is pc.Evidence.ATTESTED
        res = await p402.record_batch([{"model": MODEL, "owners": OWNERS,
                                        "input_tokens": 5}])
        assert res[0].evidence is pc.Evidence.ATTESTED


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "try again"

    def trailing_metadata(self):
        return ()


def test_every_attempt_is_signed_afresh():
    """The server consumes a nonce once it verifies, so a retry must not reuse one."""
    seen: list[dict] = []

    def record(request, *, timeout, metadata):
        seen.append(dict(metadata))
        if len(seen) < 3:
            raise _Unavailable()
        return meter_pb2.RecordResponse(event_id=request.event_id)

    with pc.P402Client("127.0.0.1:1", api_key="p402_x", retries=3, backoff=0.0,
                       gateway_id="gw_1", gateway_secret="ab" * 32) as client:
        client._meter.Record = record  # the stub method _call recognises
        client.record(model=MODEL, input_tokens=1)
    assert len(seen) == 3
    assert len({m["x-p402-nonce"] for m in seen}) == 3
    assert all(m["authorization"] == "Bearer p402_x" and m["x-p402-gateway-id"] == "gw_1"
               for m in seen)

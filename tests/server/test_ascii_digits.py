"""Numbers read from text take ASCII digits only. str.isdigit() also takes "²" (which
int() refuses: a crash instead of a clear error) and "٣" (which int() reads as 3: a
value the user never wrote); every such check in P402 says no to both."""
from __future__ import annotations

import grpc
import pytest

from p402.v1 import meter_pb2
from p402_server.privacy import signing
from p402_server.wire.errors import ServiceError

NOT_ASCII = ["²", "٣٠٠٠", "4020²"]


@pytest.mark.parametrize("ts", NOT_ASCII)
def test_a_signed_report_timestamp_in_other_digits_is_invalid(ts):
    secret = b"k" * 32
    req = meter_pb2.RecordRequest(model="gpt-4o")
    nonce = "n" * 24
    headers = {signing.GATEWAY_HEADER: "gw_1", signing.TIMESTAMP_HEADER: ts,
               signing.NONCE_HEADER: nonce,
               signing.SIGNATURE_HEADER: signing.sign(
                   secret, "Record", ts, nonce, signing.canonical_request(req))}
    with pytest.raises(ServiceError) as err:
        signing.verify_call(headers, "Record", req, tenant_id="t",
                            gateways={"gw_1": {"secret": signing.seal(secret)}},
                            skew_seconds=300, nonces=signing.NonceCache())
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.reason == "SIGNATURE_INVALID"


@pytest.mark.parametrize("port", NOT_ASCII)
def test_listen_addresses_in_other_digits_are_refused_naming_the_flag(port):
    from p402_server.cli.common import UsageError, _listen_check
    from p402_server.dashboard import parse_address
    from p402_server.listen import busy

    with pytest.raises(UsageError, match="is not HOST:PORT"):
        _listen_check("--listen", f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="^--http: .* is not HOST:PORT"):
        parse_address(f"127.0.0.1:{port}")
    assert not busy(f"127.0.0.1:{port}")  # read as no port, never as 3000


def test_group_values_in_other_digits_are_shown_as_they_are():
    from p402_client._convert import _group
    from p402_server.cli.output import group_label

    assert group_label("hour", "²") == "²" and group_label("day", "-٣") == "-٣"
    assert _group({"decision": "²", "outcome": "٣"}) == {"decision": "²", "outcome": "٣"}
    assert _group({"decision": "3"})["decision"] == "DENY"

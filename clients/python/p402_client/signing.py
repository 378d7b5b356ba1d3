"""`GatewaySigner`: signed reports from a tenant's own gateway (privacy mode
private_gateway).

Owns the client half of the signature scheme documented in
proto/p402/v1/meter.proto ("Signed reports"); the server's half is
p402_server/privacy/signing.py, and a test checks the two agree byte for byte. A signed
Record or RecordBatch that the server verifies is committed with evidence
ATTESTED; an unsigned, badly signed, stale or replayed one is refused with
UNAUTHENTICATED (`p402_client.Unauthenticated`, `.reason` one of
SIGNATURE_MISSING, GATEWAY_UNKNOWN, SIGNATURE_INVALID, SIGNATURE_STALE,
NONCE_REPLAYED) before anything is settled.

Per call, four metadata entries:

    x-p402-gateway-id   the gateway's id (AdminService.RegisterGateway)
    x-p402-timestamp    Unix seconds, decimal
    x-p402-nonce        a fresh random nonce (24 random bytes, URL-safe base64)
    x-p402-signature    "v1=" + hex HMAC-SHA256(secret, S)

    S = "P402-HMAC-SHA256\\n" + method + "\\n" + timestamp + "\\n" + nonce + "\\n"
        + hex SHA-256(request.SerializeToString(deterministic=True))

`method` is "Record" or "RecordBatch". The client signs every attempt afresh (new
timestamp and nonce): the server consumes a nonce once it verifies, so a retry of
the same bytes would otherwise be refused as a replay. Record's event id makes
the retry itself safe.

Use it through the client, which signs every Record and RecordBatch (the
`Recorder` and `meter()` included):

    P402Client(target, api_key, gateway_id="gw_finance", gateway_secret=secret_hex)

or build the metadata yourself for a stub of your own: `signer.metadata("Record",
request)`.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
import time
from typing import Any, Callable

from .errors import InvalidArgument

GATEWAY_HEADER = "x-p402-gateway-id"
TIMESTAMP_HEADER = "x-p402-timestamp"
NONCE_HEADER = "x-p402-nonce"
SIGNATURE_HEADER = "x-p402-signature"
SCHEME = b"P402-HMAC-SHA256"
#: The calls the scheme covers (StreamRecords cannot carry per-report signatures).
SIGNED_METHODS = ("Record", "RecordBatch")


def canonical_request(message: Any) -> bytes:
    """The bytes a signature covers: protobuf's deterministic serialization."""
    return message.SerializeToString(deterministic=True)


def string_to_sign(method: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """S of the module docstring."""
    return b"\n".join((SCHEME, method.encode(), timestamp.encode(), nonce.encode(),
                       hashlib.sha256(body).hexdigest().encode()))


def _secret_bytes(secret: Any) -> bytes:
    if isinstance(secret, str):
        try:
            secret = bytes.fromhex(secret)
        except ValueError:
            raise InvalidArgument("gateway_secret", "must be the hex secret "
                                  "RegisterGateway returned (or its bytes)") from None
    if not isinstance(secret, (bytes, bytearray)):
        raise InvalidArgument("gateway_secret", f"must be hex str or bytes, got "
                                                f"{type(secret).__name__}")
    if len(secret) < 16:
        raise InvalidArgument("gateway_secret", "is too short to be a gateway secret "
                                                "(RegisterGateway returns 32 bytes)")
    return bytes(secret)


class GatewaySigner:
    """Signs Record / RecordBatch requests for one registered gateway.

    `secret` is the hex string RegisterGateway returned (or its raw bytes); it stays
    in this object and is never logged or shown by repr(). `clock` (Unix seconds)
    is for tests.
    """

    __slots__ = ("gateway_id", "_secret", "_clock")

    def __init__(self, gateway_id: str, secret: str | bytes, *,
                 clock: Callable[[], float] = time.time):
        if not isinstance(gateway_id, str) or not gateway_id:
            raise InvalidArgument("gateway_id", "is required (the id RegisterGateway "
                                                "returned)")
        self.gateway_id = gateway_id
        self._secret = _secret_bytes(secret)
        self._clock = clock

    def sign(self, method: str, timestamp: str, nonce: str, body: bytes) -> str:
        """The x-p402-signature value for these parts."""
        mac = hmac.new(self._secret, string_to_sign(method, timestamp, nonce, body),
                       hashlib.sha256)
        return "v1=" + mac.hexdigest()

    def metadata(self, method: str, request: Any, *, timestamp: int | None = None,
                 nonce: str | None = None) -> tuple[tuple[str, str], ...]:
        """The four call-metadata entries that sign `request` for `method`."""
        if method not in SIGNED_METHODS:
            raise InvalidArgument("method", f"only {' and '.join(SIGNED_METHODS)} calls "
                                            f"are signed, not {method!r}")
        ts = str(int(self._clock()) if timestamp is None else int(timestamp))
        nonce = nonce or _secrets.token_urlsafe(24)
        sig = self.sign(method, ts, nonce, canonical_request(request))
        return ((GATEWAY_HEADER, self.gateway_id), (TIMESTAMP_HEADER, ts),
                (NONCE_HEADER, nonce), (SIGNATURE_HEADER, sig))

    def __repr__(self) -> str:
        return f"GatewaySigner(gateway_id={self.gateway_id!r})"


__all__ = ["GatewaySigner", "SIGNED_METHODS", "canonical_request", "string_to_sign",
           "GATEWAY_HEADER", "TIMESTAMP_HEADER", "NONCE_HEADER", "SIGNATURE_HEADER"]

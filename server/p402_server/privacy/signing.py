"""Signed reports from a tenant's own gateway (privacy mode private_gateway), and the
sealing of the tenant secrets the server keeps.

Owns the signature scheme (documented in proto/p402/v1/meter.proto, "Signed
reports"), its verification (`verify_call`), the replay memory (`NonceCache`), the
helpers a gateway uses to sign (`signature_metadata`), and `seal` / `unseal`.

Secrets at rest. HMAC needs the gateway's secret on the server, so it cannot be
stored as a hash like an API key. Every tenant secret (gateway secrets, the
fingerprint salt, the evidence key) is stored inside the tenant's settings row as
``"v1:" + base64(AES-256-GCM(nonce || ciphertext))`` when the environment variable
``P402_SECRET_KEY`` (32 bytes as 64 hex digits) is set, else as ``"raw:" +
base64`` (the database's own protection applies). `warn_if_unsealed()` says so:
`server.serve` (``p402 serve``) calls it once at start, so a production server
logs one warning, while embedded servers (``p402 demo``, tests) stay quiet; a
malformed key fails the start there instead of the first tenant's creation.
Secrets never leave the server: no RPC returns them (RegisterGateway shows a
gateway's secret exactly once), exports carry none, and no log line names them.

Replays. A nonce is remembered per (tenant, gateway) for twice the skew window
after it was accepted; a request is accepted only while its timestamp is within
the window of the server's clock, so any replay after its nonce is forgotten is
stale anyway. The memory is per process: with several server processes a replay
sent to another process within the window would be accepted (documented limit;
scale-out moves it to the store).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets as _secrets
import time
from collections import OrderedDict

import grpc

from p402_server.wire.errors import ServiceError

log = logging.getLogger("p402.server.signing")

GATEWAY_HEADER = "x-p402-gateway-id"
TIMESTAMP_HEADER = "x-p402-timestamp"
NONCE_HEADER = "x-p402-nonce"
SIGNATURE_HEADER = "x-p402-signature"
SCHEME = b"P402-HMAC-SHA256"
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_SIG = re.compile(r"^v1=([0-9a-f]{64})$")
NONCE_MEMORY = 1_000_000  # per process; past it the oldest go (they are stale)

# --- sealing ----------------------------------------------------------------------

_warned = False


def warn_if_unsealed() -> bool:
    """Log, once per process, that tenant secrets will be stored unsealed when
    P402_SECRET_KEY is not set; True when it is not. Raises ValueError for a
    malformed key (module docstring)."""
    global _warned
    if _master_key() is not None:
        return False
    if not _warned:
        _warned = True
        log.warning("P402_SECRET_KEY is not set: tenant secrets are stored unsealed "
                    "(protected only by the database's access control)")
    return True


def _master_key() -> bytes | None:
    raw = os.environ.get("P402_SECRET_KEY", "")
    if not raw:
        return None
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("P402_SECRET_KEY: must be 32 bytes as 64 hex digits")
    return key


def seal(secret: bytes) -> str:
    """A secret as it is stored (module docstring)."""
    key = _master_key()
    if key is None:  # warned at server start (warn_if_unsealed), never per secret
        return "raw:" + base64.b64encode(secret).decode()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return "v1:" + base64.b64encode(nonce + AESGCM(key).encrypt(nonce, secret, b"p402")).decode()


def unseal(stored: str) -> bytes:
    """The secret back from `seal`'s form."""
    scheme, _, body = stored.partition(":")
    data = base64.b64decode(body)
    if scheme == "raw":
        return data
    if scheme == "v1":
        key = _master_key()
        if key is None:
            raise ValueError("a sealed tenant secret needs P402_SECRET_KEY")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return AESGCM(key).decrypt(data[:12], data[12:], b"p402")
    raise ValueError(f"unknown secret encoding {scheme!r}")


# --- the scheme -------------------------------------------------------------------

def canonical_request(message) -> bytes:
    """The bytes a signature covers: deterministic protobuf serialization."""
    return message.SerializeToString(deterministic=True)


def string_to_sign(method: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return b"\n".join((SCHEME, method.encode(), timestamp.encode(), nonce.encode(),
                       hashlib.sha256(body).hexdigest().encode()))


def sign(secret: bytes, method: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The x-p402-signature value."""
    mac = hmac.new(secret, string_to_sign(method, timestamp, nonce, body), hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signature_metadata(gateway_id: str, secret: bytes | str, method: str, message, *,
                       timestamp: int | None = None, nonce: str | None = None) -> tuple:
    """The call metadata a gateway sends with a signed Record / RecordBatch."""
    if isinstance(secret, str):
        secret = bytes.fromhex(secret)
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or _secrets.token_urlsafe(24)
    sig = sign(secret, method, ts, nonce, canonical_request(message))
    return ((GATEWAY_HEADER, gateway_id), (TIMESTAMP_HEADER, ts), (NONCE_HEADER, nonce),
            (SIGNATURE_HEADER, sig))


def _reject(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message,
                        field=SIGNATURE_HEADER)


def call_headers(context) -> dict[str, str]:
    """The x-p402-* signature headers of a call ({} when unsigned)."""
    out = {}
    for key, value in context.invocation_metadata() or ():
        if key.startswith("x-p402-"):
            out[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return out


class NonceCache:
    """Accepted nonces per (tenant, gateway), each kept `2 × skew` (docstring)."""

    def __init__(self, limit: int = NONCE_MEMORY, clock=time.monotonic):
        self._seen: OrderedDict = OrderedDict()
        self._limit = limit
        self._clock = clock

    def _sweep(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, until = next(iter(seen.items()))
            if until > now and len(seen) <= self._limit:
                break
            seen.popitem(last=False)

    def seen(self, key: tuple) -> bool:
        self._sweep(self._clock())
        return key in self._seen

    def add(self, key: tuple, keep_seconds: float) -> None:
        self._seen[key] = self._clock() + keep_seconds


def verify_call(headers: dict, method: str, message, *, tenant_id: str,
                gateways: dict, skew_seconds: int, nonces: NonceCache,
                now: float | None = None) -> str:
    """Check a signed call -> the gateway id, or raise UNAUTHENTICATED with the reason.

    `gateways`: gateway_id -> {"secret": sealed, "revoked_ms": int|None, …}. The
    nonce is consumed only when everything else holds (a forged request cannot
    burn a legitimate gateway's nonce)."""
    gateway_id = headers.get(GATEWAY_HEADER, "")
    signature = headers.get(SIGNATURE_HEADER, "")
    if not signature or not gateway_id:
        raise _reject("SIGNATURE_MISSING",
                      "private_gateway reports must be signed: send x-p402-gateway-id, "
                      "x-p402-timestamp, x-p402-nonce and x-p402-signature")
    gw = gateways.get(gateway_id)
    if gw is None or gw.get("revoked_ms"):
        raise _reject("GATEWAY_UNKNOWN", f"gateway {gateway_id[:64]!r} is not registered "
                                         "for this tenant, or was revoked")
    ts = headers.get(TIMESTAMP_HEADER, "")
    nonce = headers.get(NONCE_HEADER, "")
    if not (ts.isascii() and ts.isdigit()) or len(ts) > 12:
        raise _reject("SIGNATURE_INVALID", "x-p402-timestamp must be Unix seconds")
    if not _NONCE.match(nonce):
        raise _reject("SIGNATURE_INVALID",
                      "x-p402-nonce must be 16-128 characters of [A-Za-z0-9_-]")
    m = _SIG.match(signature)
    if m is None:
        raise _reject("SIGNATURE_INVALID", "x-p402-signature must be v1=<64 hex digits>")
    expected = sign(unseal(gw["secret"]), method, ts, nonce, canonical_request(message))
    if not hmac.compare_digest(expected, signature):
        raise _reject("SIGNATURE_INVALID", "the signature does not match the request")
    now = time.time() if now is None else now
    if abs(now - int(ts)) > skew_seconds:
        raise _reject("SIGNATURE_STALE", f"x-p402-timestamp is more than {skew_seconds} s "
                                         "from the server's clock")
    key = (tenant_id, gateway_id, nonce)
    if nonces.seen(key):
        raise _reject("NONCE_REPLAYED", "this nonce was already used: a replayed report")
    nonces.add(key, 2 * skew_seconds)
    return gateway_id


def stream_refused() -> ServiceError:
    return _reject("SIGNATURE_MISSING", "StreamRecords cannot carry per-report "
                   "signatures: send private_gateway reports with Record or RecordBatch")


def new_gateway_secret() -> bytes:
    return os.urandom(32)


__all__ = [
    "GATEWAY_HEADER",
    "TIMESTAMP_HEADER",
    "NONCE_HEADER",
    "SIGNATURE_HEADER",
    "NonceCache",
    "canonical_request",
    "string_to_sign",
    "sign",
    "signature_metadata",
    "verify_call",
    "call_headers",
    "seal",
    "unseal",
    "warn_if_unsealed",
    "new_gateway_secret",
    "new_evidence_key",
    "public_key_hex",
]


# --- the evidence key: the tenant's Ed25519 signing key (exports, receipts,
# statements), kept sealed in its secrets like the others -----------------------

def new_evidence_key() -> bytes:
    """32 raw bytes of a new Ed25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                      NoEncryption())


def public_key_hex(private: bytes) -> str:
    """The hex of the Ed25519 public key of a raw private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

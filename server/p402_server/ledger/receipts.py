"""Receipts: one ledger event as a compact, signed document that anyone can check
offline with the tenant's public evidence keys alone.

Owns the receipt format (version 1, below), `build` (sign with the tenant's current
evidence key), `verify` (against a key set), the key ids, and the published key set
(`key_set`, served by AdminService.GetEvidenceKeys, `p402 keys evidence --public` and
`/.well-known/p402-keys.json?tenant=ID` on the HTTP port).

Receipt, version 1
------------------
UTF-8 JSON, canonical: keys sorted, no whitespace (`json.dumps(sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`), of

    v              1
    typ            "p402.receipt"
    tenant_id, event_id, kind ("record", "expired", "released", "denied")
    event_time_ms  when the call happened (Unix ms, UTC)
    owners         the non-empty owner dimensions {customer, feature, …}
    model, provider, catalog_version
    usage          the non-zero Usage counts by field name, and service_tier if any
    cost_nanos     integer nano-USD; currency "USD"
    evidence       ESTIMATED / REPORTED / FINGERPRINTED / ATTESTED
    chain_index, chain_hash   the event's place in the tenant's hash chain
    kid            the signing key's id: the first 16 hex digits of SHA-256 of its
                   raw 32-byte Ed25519 public key
    sig            hex Ed25519 signature over the canonical JSON of every other field

No content, ever (prompts, responses, labels and fingerprints are not in it), in every
privacy mode. Rotating the evidence key (AdminService.RotateEvidenceKey) keeps the old
public keys in the published set as "retired": a receipt verifies against the key its
`kid` names, so old receipts stay verifiable.
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Iterable

from p402_server.privacy import signing as _signing
from p402core import OWNER_KEYS, Evidence

VERSION = 1
TYPE = "p402.receipt"
_TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens",
                 "output_tokens", "reasoning_tokens")
_FIELDS = frozenset(("v", "typ", "tenant_id", "event_id", "kind", "event_time_ms", "owners",
                     "model", "provider", "catalog_version", "usage", "cost_nanos",
                     "currency", "evidence", "chain_index", "chain_hash", "kid", "sig"))


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_hex: str) -> str:
    """The id of an Ed25519 public key (hex): 16 hex digits of its SHA-256."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def document(ev) -> dict:
    """The unsigned receipt of a committed LedgerEvent (module docstring), without kid."""
    usage = {k: getattr(ev, k) for k in _TOKEN_FIELDS if getattr(ev, k)}
    usage.update({k: n for k, n in (ev.units or {}).items() if n})
    if ev.service_tier:
        usage["service_tier"] = ev.service_tier
    return {
        "v": VERSION, "typ": TYPE, "tenant_id": ev.tenant_id, "event_id": ev.event_id,
        "kind": ev.kind, "event_time_ms": ev.event_ms,
        "owners": {k: getattr(ev, k) for k in OWNER_KEYS if getattr(ev, k)},
        "model": ev.model, "provider": ev.provider, "catalog_version": ev.catalog_version,
        "usage": usage, "cost_nanos": ev.cost_nanos, "currency": "USD",
        "evidence": Evidence(ev.evidence).name, "chain_index": ev.chain_index or 0,
        "chain_hash": ev.chain_hash or "",
    }


class Signer:
    """Signs receipts with one Ed25519 private key (32 raw bytes)."""

    def __init__(self, private: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(private)
        self.public_hex = _signing.public_key_hex(private)
        self.kid = key_id(self.public_hex)

    def sign(self, ev) -> str:
        """The receipt of `ev` (a committed LedgerEvent) as JSON text."""
        return self.sign_document(document(ev))

    def sign_document(self, doc: dict) -> str:
        """`doc` with this key's kid and its signature ("sig": hex Ed25519 over the
        canonical JSON of every other field), as canonical JSON text."""
        doc = {**doc, "kid": self.kid}
        doc["sig"] = self._key.sign(canonical(doc)).hex()
        return canonical(doc).decode()


def build(ev, private: bytes) -> str:
    return Signer(private).sign(ev)


def verify_signed(text: str | bytes, keys: dict[str, str], typ: str, version: int,
                  fields: frozenset | None = None) -> tuple[bool, str, dict | None]:
    """Check a document Signer.sign_document made against `keys` ({kid: public key
    hex}): (valid, why not, the document). Invalid when it is not a `typ` document of
    `version`, has a field outside `fields` (when given), names a key not in the set,
    or was changed in any byte that matters (the signature covers every field)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return False, "not JSON", None
    what = typ.split(".")[-1]
    if not isinstance(doc, dict) or doc.get("typ") != typ or doc.get("v") != version:
        return False, f"not a version {version} P402 {what}", None
    extra = set(doc) - fields if fields is not None else set()
    if extra:
        return False, f"unknown field {sorted(extra)[0]!r}", doc
    kid, sig = doc.get("kid"), doc.get("sig")
    if not isinstance(kid, str) or kid not in keys:
        return False, f"signed by unknown key {kid!r}", doc
    if not isinstance(sig, str):
        return False, "no signature", doc
    body = {k: v for k, v in doc.items() if k != "sig"}
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(keys[kid]))
        public.verify(bytes.fromhex(sig), canonical(body))
    except (ValueError, InvalidSignature):
        return False, f"the signature does not verify: the {what} was altered", doc
    return True, "", doc


def verify(text: str | bytes, keys: dict[str, str]) -> tuple[bool, str, dict | None]:
    """Check a receipt against `keys` ({kid: public key hex}) (verify_signed)."""
    return verify_signed(text, keys, TYPE, VERSION, _FIELDS)


# --- the published key set -------------------------------------------------------

def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk(public_hex: str, status: str, retired_ms: int = 0) -> dict:
    """One key as a JSON Web Key (RFC 8037: kty OKP, crv Ed25519), with P402's
    hex form, status ("active" signs new receipts, "retired" only verifies) and the
    time it was retired."""
    key = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(bytes.fromhex(public_hex)),
           "kid": key_id(public_hex), "use": "sig", "alg": "EdDSA",
           "public_key_hex": public_hex, "status": status}
    if retired_ms:
        key["retired_ms"] = retired_ms
    return key


def key_set(tenant_id: str, active_hex: str, retired: Iterable[dict]) -> dict:
    """The tenant's public evidence keys: {"tenant_id", "keys": [JWK…]}, the active
    one first."""
    keys = [jwk(active_hex, "active")]
    keys += [jwk(r["public_key"], "retired", int(r.get("retired_ms") or 0)) for r in retired]
    return {"tenant_id": tenant_id, "keys": keys}


def keys_from_set(data: Any) -> dict[str, str]:
    """{kid: public key hex} from a published key set (or a bare list of keys);
    a key whose kid does not match its public key is left out."""
    items = data.get("keys") if isinstance(data, dict) else data
    out: dict[str, str] = {}
    for k in items if isinstance(items, list) else ():
        if not isinstance(k, dict):
            continue
        pub = k.get("public_key_hex")
        if not isinstance(pub, str) and isinstance(k.get("x"), str):
            try:
                pub = base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4)).hex()
            except ValueError:
                continue
        try:
            if isinstance(pub, str) and len(bytes.fromhex(pub)) == 32 and \
                    k.get("kid", key_id(pub)) == key_id(pub):
                out[key_id(pub)] = pub
        except ValueError:
            continue
    return out


__all__ = ["VERSION", "TYPE", "canonical", "key_id", "document", "Signer", "build",
           "verify", "verify_signed", "jwk", "key_set", "keys_from_set"]

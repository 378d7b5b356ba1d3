"""Evidence: the status of each event, the signed export digest, the export file
formats and their verification (`p402 verify --file`).

Owns:

- ``evidence_for(base, fingerprinted, attested)`` — DESIGN §3: ESTIMATED when only the
  pre-call estimate exists (denied and expired events: the engine says so; and a
  Record flagged ``usage_estimated``, which runtime/tenant.py keeps ESTIMATED), REPORTED
  for usage the caller reported, FINGERPRINTED when content fingerprints are attached,
  ATTESTED when the report came over a signed channel and verified (the strongest
  wins; a signed report with fingerprints is ATTESTED).
- The tenant's evidence key: Ed25519 (``cryptography``), generated with the tenant's
  secrets. Ed25519 rather than HMAC because the point of a signed export is that a
  third party (auditor, finance) can check it with the public key alone
  (``Settings.evidence_public_key``), without being able to forge one.
- ``DigestBuilder``: the closing digest of an export — version, tenant, count, first
  and last chain_index, head (the last row's chain hash), ``rows_sha256`` (SHA-256 of
  every row's chain hash, hex, each followed by "\\n", in export order), the time
  range asked for and the one seen, the catalog versions, the creation time, the
  public key and ``signature`` (hex Ed25519 over the digest's canonical JSON: sorted
  keys, no spaces, UTF-8, without the signature itself).
- Export rows: ``event_row(pb)`` (a flat-ish dict of every economic field and the
  chain fields; no content) and the three formats: ``jsonl`` (one JSON object per
  line, then ``{"digest": …}``), ``csv`` (flat columns, then a comment line
  ``# digest {json}``), ``focus`` (FinOps FOCUS 1.x columns plus ``x_`` columns with
  every P402 field; its digest is the same trailing comment line).
- ``verify_export(path, public_key=None)``: rebuild every row's LedgerEvent, re-hash
  the chain (ledger/canonical.py), check links between consecutive positions, the
  order, the digest's count / head / rows hash and its signature; names the first
  bad row.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from typing import Any, NamedTuple

from p402_server.ledger import canonical
from p402_server.ledger.model import LedgerEvent
from p402_server.privacy.signing import public_key_hex
from p402core import OWNER_KEYS, Decision, Evidence, Outcome, PrivacyMode, _units
from p402core.contract import reportable_ms

DIGEST_VERSION = 1
DIGEST_HEADER = "x-p402-export-digest"
CSV_DIGEST_PREFIX = "# digest "
FORMATS = ("csv", "jsonl", "focus")

_REPORTED, _FINGERPRINTED, _ATTESTED = (int(Evidence.REPORTED), int(Evidence.FINGERPRINTED),
                                         int(Evidence.ATTESTED))


def evidence_for(base: int, *, fingerprinted: bool = False, attested: bool = False) -> int:
    """The evidence status of an event (module docstring)."""
    if attested:
        return _ATTESTED
    if fingerprinted and base == _REPORTED:
        return _FINGERPRINTED
    return int(base)


def _canonical_json(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_digest(private: bytes, digest: dict) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    body = {k: v for k, v in digest.items() if k != "signature"}
    body["public_key"] = public_key_hex(private)
    sig = Ed25519PrivateKey.from_private_bytes(private).sign(_canonical_json(body))
    return {**body, "signature": sig.hex()}


def verify_digest_signature(digest: dict, public_key: str | None = None) -> str:
    """"" when the signature holds (against `public_key`, else the digest's own key),
    else why not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key_hex = public_key or digest.get("public_key") or ""
    if public_key and digest.get("public_key") and digest["public_key"] != public_key:
        return "the digest was signed by another key than the one given"
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        sig = bytes.fromhex(digest.get("signature") or "")
    except ValueError:
        return "the digest's public key or signature is malformed"
    body = {k: v for k, v in digest.items() if k != "signature"}
    try:
        key.verify(sig, _canonical_json(body))
    except InvalidSignature:
        return "the digest's signature does not verify: the digest was altered"
    return ""


class DigestBuilder:
    """Accumulates the exported events' chain fields; `finish` signs (docstring)."""

    def __init__(self, tenant_id: str, since_ms: int = 0, until_ms: int = 0):
        self.tenant_id = tenant_id
        self.since_ms, self.until_ms = since_ms, until_ms
        self.count = 0
        self.first_index = self.last_index = 0
        self.head = ""
        self.min_ms = self.max_ms = 0
        self.catalogs: set[str] = set()
        self._rows = hashlib.sha256()

    def add(self, chain_index: int, chain_hash: str, event_ms: int, catalog: str) -> None:
        if not self.count:
            self.first_index = chain_index
            self.min_ms = self.max_ms = event_ms
        self.count += 1
        self.last_index = chain_index
        self.head = chain_hash
        self.min_ms = min(self.min_ms, event_ms)
        self.max_ms = max(self.max_ms, event_ms)
        if catalog:
            self.catalogs.add(catalog)
        self._rows.update(chain_hash.encode() + b"\n")

    def digest(self, created_ms: int) -> dict:
        return {
            "version": DIGEST_VERSION,
            "tenant_id": self.tenant_id,
            "count": self.count,
            "first_chain_index": self.first_index,
            "last_chain_index": self.last_index,
            "head": self.head,
            "rows_sha256": self._rows.hexdigest(),
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "first_event_ms": self.min_ms,
            "last_event_ms": self.max_ms,
            "catalog_versions": sorted(self.catalogs),
            "created_ms": created_ms,
        }

    def finish(self, private: bytes, created_ms: int) -> dict:
        return sign_digest(private, self.digest(created_ms))


class ChainedExport:
    """One export: the events matching a filter in ledger order, each carrying the
    chain hash before it (so a filtered export verifies on its own), then the
    digest signed with the tenant's evidence key. `ExportEvents` streams it over
    gRPC (`p402 export`), the dashboard writes it into its downloads: the same rows
    and the same digest either way."""

    def __init__(self, store, tenant_id: str, flt):
        self.store, self.tenant_id, self.flt = store, tenant_id, flt
        self.builder = DigestBuilder(tenant_id, flt.since_ms, flt.until_ms)

    async def events(self):
        """The export's events as wire `Event`s (prev_chain_hash filled), in order."""
        from p402_server.ledger.canonical import GENESIS
        from p402_server.wire import convert

        prev_index, prev_hash = 0, ""
        async for ev in self.store.iter_events(self.tenant_id, self.flt):
            e = convert.event_to_proto(ev)
            index = ev.chain_index or 0
            if index:
                if index == 1:
                    e.prev_chain_hash = GENESIS
                elif index == prev_index + 1:
                    e.prev_chain_hash = prev_hash
                else:
                    e.prev_chain_hash = await self._chain_hash_at(index - 1)
                prev_index, prev_hash = index, e.chain_hash
            self.builder.add(index, e.chain_hash, ev.event_ms, ev.catalog_version)
            yield e

    async def _chain_hash_at(self, chain_index: int) -> str:
        """The chain hash at a position (a filtered export's gap), "" if none."""
        import sqlalchemy as sa

        from p402_server.ledger import schema

        q = (sa.select(schema.events.c.chain_hash)
             .where(schema.events.c.tenant_id == self.tenant_id,
                    schema.events.c.chain_index == chain_index))
        async with self.store.engine.connect() as conn:
            return (await conn.execute(q)).scalar() or ""

    def finish(self, settings: dict, created_ms: int) -> dict:
        """The signed digest of what `events` gave, with the tenant's evidence key
        (from its settings, unsealed here)."""
        from p402_server.privacy import modes as privacy
        from p402_server.privacy import signing

        private = signing.unseal((settings.get(privacy.SECRETS) or {})["evidence_key"])
        return self.builder.finish(private, created_ms)


# --- export rows ------------------------------------------------------------------

_USAGE = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
          "reasoning_tokens")
# The other Usage counts (p402core._units.UNITS): exported as numbers (0 = unused);
# with service_tier, part of what the chain covers (canonical encoding v2).
_UNIT_COLS = _units.UNITS
_MONEY = ("cost", "estimated_cost", "overrun", "revenue")


def _nanos(m) -> int:
    return m.units * 1_000_000_000 + m.nanos


def _usd(nanos: int) -> str:
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), 1_000_000_000)
    return f"{sign}{whole}.{frac:09d}"


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(reportable_ms(ms) / 1000, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z" if ms else ""


def _name(enum, value: int) -> str:
    try:
        name = enum(value).name
    except ValueError:
        return str(value)
    return name


def event_row(e) -> dict[str, Any]:
    """One export row of a p402.v1.Event (JSON-ready; owners and usage nested)."""
    row: dict[str, Any] = {
        "event_id": e.event_id,
        "sequence": e.sequence,
        "kind": e.kind,
        "event_time": _iso(e.event_time_ms),
        "event_time_ms": e.event_time_ms,
        "record_time_ms": e.record_time_ms,
        "reservation_id": e.reservation_id,
        "owners": {k: getattr(e.owners, k) for k in OWNER_KEYS},
        "labels": dict(sorted(e.labels.items())),
        "provider": e.provider,
        "model": e.model,
        "usage": {**{k: getattr(e.usage, k) for k in (*_USAGE, *_UNIT_COLS)},
                  "service_tier": e.usage.service_tier},
    }
    for m in _MONEY:
        row[f"{m}_nanos"] = _nanos(getattr(e, m))
    row["cost_usd"] = _usd(row["cost_nanos"])
    row.update({
        "decision": _name(Decision, e.decision),
        "reasons": list(e.reasons),
        "rule_ids": list(e.rule_ids),
        "budget_ids": list(e.budget_ids),
        "budget_charges": [[c.budget_id, c.period_start_time_ms] for c in e.budget_charges],
        "outcome": _name(Outcome, e.outcome),
        "evidence": _name(Evidence, e.evidence),
        "privacy_mode": _name(PrivacyMode, e.privacy_mode),
        "attempt": e.attempt,
        "retry_of": e.retry_of,
        "catalog_version": e.catalog_version,
        "duplicate_of": e.duplicate_of or None,
        "prompt_fingerprint": e.prompt_fingerprint or None,
        "response_fingerprint": e.response_fingerprint or None,
        "chain_index": e.chain_index,
        "prev_chain_hash": e.prev_chain_hash,
        "chain_hash": e.chain_hash,
    })
    return row


def flat_row(row: dict) -> dict[str, Any]:
    """The CSV form: owners and usage inlined, lists and dicts as JSON, None as ""."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in ("owners", "usage"):
            out.update(v)
        elif isinstance(v, (list, dict)):
            out[k] = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        elif v is None:
            out[k] = ""
        else:
            out[k] = v
    return out


CSV_COLUMNS = tuple(flat_row(event_row(__import__("p402.v1.meter_pb2", fromlist=["x"])
                                       .Event())))

# FinOps FOCUS 1.x (FinOps Open Cost and Usage Specification) columns, then every
# P402 field as an x_ column (so a FOCUS file verifies like the others).
FOCUS_COLUMNS = (
    "BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "BillingCurrency",
    "ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd",
    "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency",
    "ServiceName", "ServiceCategory", "ProviderName", "PublisherName", "InvoiceIssuerName",
    "ResourceId", "ResourceName", "ResourceType", "ConsumedQuantity", "ConsumedUnit",
    "PricingQuantity", "PricingUnit", "SkuId", "Tags",
)
FOCUS_X_COLUMNS = tuple("x_" + c for c in CSV_COLUMNS)


def _focus_time(ms: int) -> str:
    return dt.datetime.fromtimestamp(reportable_ms(ms) / 1000, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ") if ms else ""


def focus_row(row: dict) -> dict[str, Any]:
    """A FOCUS row: costs in USD decimals, tokens as consumed quantity, the model
    as the resource, owners and labels as Tags (JSON), every P402 field as x_."""
    cost = _usd(row["cost_nanos"])
    tokens = sum(row["usage"][k] for k in ("input_tokens", "output_tokens"))
    tags = {k: v for k, v in row["owners"].items() if v}
    tags.update({f"label.{k}": v for k, v in row["labels"].items()})
    start = row["event_time_ms"]
    period = dt.datetime.fromtimestamp(reportable_ms(start) / 1000, dt.timezone.utc) if start else None
    month_start = month_end = ""
    if period is not None:
        m0 = period.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        m1 = (m0 + dt.timedelta(days=32)).replace(day=1)
        month_start, month_end = (m0.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                  m1.strftime("%Y-%m-%dT%H:%M:%SZ"))
    out = {
        "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost, "ContractedCost": cost,
        "BillingCurrency": "USD",
        "ChargePeriodStart": _focus_time(start),
        "ChargePeriodEnd": _focus_time(start + 1000) if start else "",
        "BillingPeriodStart": month_start, "BillingPeriodEnd": month_end,
        "ChargeCategory": "Usage", "ChargeClass": "",
        "ChargeDescription": f"{row['kind']} {row['model']} ({row['outcome']})",
        "ChargeFrequency": "Usage-Based",
        "ServiceName": f"{row['provider'] or 'unknown'} {row['model']}".strip(),
        "ServiceCategory": "AI and Machine Learning",
        "ProviderName": row["provider"], "PublisherName": row["provider"],
        "InvoiceIssuerName": row["provider"],
        "ResourceId": row["model"], "ResourceName": row["model"], "ResourceType": "Model",
        "ConsumedQuantity": tokens, "ConsumedUnit": "Tokens",
        "PricingQuantity": tokens, "PricingUnit": "Tokens",
        "SkuId": row["model"],
        "Tags": json.dumps(tags, sort_keys=True, ensure_ascii=False),
    }
    for k, v in flat_row(row).items():
        out["x_" + k] = v
    return out


class ExportWriter:
    """Writes rows in one format to a text stream, then the digest."""

    def __init__(self, fh, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"format: one of {', '.join(FORMATS)}")
        self.fh, self.fmt = fh, fmt
        self._csv = None
        if fmt in ("csv", "focus"):
            cols = CSV_COLUMNS if fmt == "csv" else FOCUS_COLUMNS + FOCUS_X_COLUMNS
            self._csv = csv.DictWriter(fh, fieldnames=list(cols))
            self._csv.writeheader()

    def row(self, row: dict) -> None:
        if self.fmt == "jsonl":
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow(flat_row(row))
        else:
            self._csv.writerow(focus_row(row))

    def digest(self, digest: dict) -> None:
        text = json.dumps(digest, sort_keys=True, ensure_ascii=False)
        if self.fmt == "jsonl":
            self.fh.write(json.dumps({"digest": digest}, sort_keys=True,
                                     ensure_ascii=False) + "\n")
        else:
            self.fh.write(CSV_DIGEST_PREFIX + text + "\r\n")


# --- reading an export back -------------------------------------------------------

class BadInput(ValueError):
    """The file is not an export this module can read (exit 2)."""


def _enum_value(enum, text) -> int:
    if isinstance(text, int):
        return text
    if text in ("", None):
        return 0
    try:
        return int(enum[text])
    except KeyError:
        return int(text)


def _int(v) -> int:
    return int(v) if v not in ("", None) else 0


def _json(v, default):
    if v in ("", None):
        return default
    return json.loads(v) if isinstance(v, str) else v


def ledger_event(row: dict, tenant_id: str) -> LedgerEvent:
    """A LedgerEvent (with chain_index / chain_hash attributes) from an export row in
    its nested (jsonl) or flat (csv, focus x_) form."""
    owners = row.get("owners") or {k: row.get(k, "") for k in OWNER_KEYS}
    usage = row.get("usage") or {k: row.get(k) for k in (*_USAGE, *_UNIT_COLS, "service_tier")}
    ev = LedgerEvent(
        tenant_id=tenant_id,
        event_id=row["event_id"],
        event_ms=_int(row["event_time_ms"]),
        recorded_ms=_int(row["record_time_ms"]),
        kind=row["kind"],
        reservation_id=row.get("reservation_id") or "",
        **{k: owners.get(k) or "" for k in OWNER_KEYS},
        labels=_json(row.get("labels"), {}),
        provider=row.get("provider") or "",
        model=row.get("model") or "",
        **{k: _int(usage.get(k)) for k in _USAGE},
        units={k: _int(usage.get(k)) for k in _UNIT_COLS if _int(usage.get(k))},
        service_tier=usage.get("service_tier") or "",
        cost_nanos=_int(row["cost_nanos"]),
        estimated_cost_nanos=_int(row["estimated_cost_nanos"]),
        overrun_nanos=_int(row["overrun_nanos"]),
        revenue_nanos=_int(row["revenue_nanos"]),
        decision=_enum_value(Decision, row["decision"]),
        reasons=tuple(_json(row.get("reasons"), [])),
        rule_ids=tuple(_json(row.get("rule_ids"), [])),
        budget_ids=tuple(_json(row.get("budget_ids"), [])),
        budget_charges=tuple((b, int(p)) for b, p in _json(row.get("budget_charges"), [])),
        outcome=_enum_value(Outcome, row["outcome"]),
        evidence=_enum_value(Evidence, row["evidence"]),
        privacy_mode=_enum_value(PrivacyMode, row["privacy_mode"]),
        attempt=_int(row.get("attempt")),
        retry_of=row.get("retry_of") or "",
        catalog_version=row.get("catalog_version") or "",
        duplicate_of=row.get("duplicate_of") or None,
        chain_hash=row.get("chain_hash") or None,
    )
    # Fingerprints and the chain position are set by name: the dataclass grows them.
    ev.prompt_fingerprint = row.get("prompt_fingerprint") or None
    ev.response_fingerprint = row.get("response_fingerprint") or None
    ev.chain_index = _int(row.get("chain_index"))
    return ev


def read_export(path: str) -> tuple[str, list[dict], dict | None]:
    """(format, rows, digest or None) of an export file; BadInput when unreadable."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise BadInput(f"{path}: empty file")
    if text.lstrip().startswith("{"):
        rows, digest = [], None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise BadInput(f"{path}:{n}: not a JSON line") from None
            if isinstance(obj, dict) and set(obj) == {"digest"}:
                digest = obj["digest"]
            elif digest is not None:
                raise BadInput(f"{path}:{n}: rows after the digest line")
            else:
                rows.append(obj)
        return "jsonl", rows, digest
    lines = text.splitlines(keepends=True)
    digest = None
    body = []
    for line in lines:
        if line.startswith(CSV_DIGEST_PREFIX):
            try:
                digest = json.loads(line[len(CSV_DIGEST_PREFIX):])
            except ValueError:
                raise BadInput(f"{path}: the digest line is not JSON") from None
        else:
            body.append(line)
    reader = csv.DictReader(io.StringIO("".join(body)))
    cols = reader.fieldnames or []
    if "event_id" in cols:
        return "csv", list(reader), digest
    if "x_event_id" in cols:
        return "focus", [{k[2:]: v for k, v in r.items() if k.startswith("x_")}
                         for r in reader], digest
    raise BadInput(f"{path}: neither a P402 CSV, FOCUS nor JSONL export")


class FileVerdict(NamedTuple):
    ok: bool
    count: int
    head: str
    bad_row: int | None  # 1-based position of the first bad row in the file
    reason: str
    fmt: str = ""
    signed_by: str = ""


def verify_rows(rows: list[dict], digest: dict | None, *,
                public_key: str | None = None, fmt: str = "") -> FileVerdict:
    """Check an export's rows and digest (module docstring)."""
    if digest is None:
        return FileVerdict(False, 0, "", None, "no digest: not a complete signed export "
                           "(export to a file, or pass --digest)", fmt)
    tenant = digest.get("tenant_id") or ""
    try:
        events = [ledger_event(r, tenant) for r in rows]
    except (KeyError, ValueError, TypeError) as exc:
        raise BadInput(f"a row is missing or has a malformed field ({exc})") from None
    prev_index = 0
    prev_hash = canonical.GENESIS  # what position 1 links to
    head = ""
    good = 0
    # A digest whose positions span exactly its count promises a gap-free export.
    contiguous = (digest.get("count") and digest.get("last_chain_index", 0)
                  - digest.get("first_chain_index", 0) + 1 == digest.get("count"))
    for pos, (row, ev) in enumerate(zip(rows, events), 1):
        index = ev.chain_index
        if not ev.chain_hash or not index:
            return FileVerdict(False, good, head, pos,
                               f"row {pos} (event {ev.event_id!r}) has no chain hash", fmt)
        if index <= prev_index:
            return FileVerdict(False, good, head, pos,
                               f"row {pos} (chain_index {index}) comes after chain_index "
                               f"{prev_index}: rows were reordered or inserted", fmt)
        prev = row.get("prev_chain_hash") or ""
        if contiguous and pos > 1 and index != prev_index + 1:
            return FileVerdict(False, good, head, pos,
                               f"chain_index {prev_index + 1} is missing before row {pos}"
                               ": a row was deleted", fmt)
        if index == prev_index + 1 and prev != prev_hash:
            return FileVerdict(False, good, head, pos,
                               f"row {pos} (chain_index {index}) does not link to the row "
                               "before it", fmt)
        try:
            got = canonical.chain_step(prev, ev)
        except ValueError:
            return FileVerdict(False, good, head, pos,
                               f"row {pos} has a malformed prev_chain_hash", fmt)
        if got != ev.chain_hash:
            return FileVerdict(False, good, head, pos,
                               f"row {pos} (event {ev.event_id!r}, chain_index {index}) "
                               "does not match its chain hash: it was modified", fmt)
        prev_index, prev_hash = index, ev.chain_hash
        head = prev_hash
        good += 1
    # The digest binds the set of rows: deletions, insertions and the order.
    rows_sha = hashlib.sha256(b"".join(e.chain_hash.encode() + b"\n" for e in events))
    if digest.get("count") != len(rows):
        return FileVerdict(False, good, head, min(len(rows), digest.get("count") or 0)
                           + 1, f"the digest counts {digest.get('count')} rows, the file "
                           f"has {len(rows)}: rows were deleted or inserted", fmt)
    if (digest.get("head") or "") != head:
        return FileVerdict(False, good, head, len(rows),
                           "the last row's chain hash is not the digest's head", fmt)
    if digest.get("rows_sha256") != rows_sha.hexdigest():
        return FileVerdict(False, good, head, None,
                           "the rows do not match the digest's rows_sha256", fmt)
    why = verify_digest_signature(digest, public_key)
    if why:
        return FileVerdict(False, good, head, None, why, fmt)
    return FileVerdict(True, good, head, None, "", fmt,
                       digest.get("public_key", ""))


def verify_export(path: str, public_key: str | None = None) -> FileVerdict:
    fmt, rows, digest = read_export(path)
    return verify_rows(rows, digest, public_key=public_key, fmt=fmt)


__all__ = [
    "DIGEST_HEADER",
    "FORMATS",
    "BadInput",
    "DigestBuilder",
    "ExportWriter",
    "FileVerdict",
    "evidence_for",
    "event_row",
    "flat_row",
    "focus_row",
    "ledger_event",
    "read_export",
    "sign_digest",
    "verify_digest_signature",
    "verify_export",
    "verify_rows",
]

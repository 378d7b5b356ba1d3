"""The canonical encoding of a ledger event and the per-tenant hash chain (DESIGN §3,
"Evidence").

Owns ``canonical_bytes`` (below), ``chain_step`` and ``verify_events`` (the
walk that ``Store.verify_chain`` and the export verifier share). The group-commit
writer (writer.py) is the only producer of chain hashes; nothing on the Authorize
path touches this module.

The chain
---------
Every committed event of a tenant has a position ``chain_index`` (1, 2, 3, … with no
gaps, in commit order) and ``chain_hash = SHA-256(prev || canonical_bytes(event))``,
where ``prev`` is the 32 raw bytes of the previous event's chain hash (32 zero bytes
for chain_index 1: ``GENESIS``) and the hash is stored as 64 lowercase hex digits.
Changing, deleting, inserting or reordering any event breaks the link at that
position, which ``verify_events`` names.

Canonical encoding
------------------
``canonical_bytes(event)`` is p402core's ``event_bytes``: versions 1 and 2 are
specified in p402core/_ledger_py.py (the pure-Python twin, which is the definition;
the compiled twin gives the same bytes). Version 1 is ``b"p402.event.v1\n"`` and
every field of the event in a fixed order as netstrings, decimals and ``~,`` for
absent strings; version 2 adds the service tier and usage units, and is used only for
events that carry them, so chains written before units existed verify unchanged.

Deliberately left out:

- ``seq``: a storage artefact (the row id of one database); a restored or exported
  ledger may number rows differently, and ``chain_index`` is the position that counts;
- ``chain_index`` and ``chain_hash``: the chain's own output (the position is bound
  through ``prev``);
- content (prompts and responses): it lives in its own table with its own retention;
  purging it must not break the chain, and the chain must never need it.

``recorded_ms`` is included (when the ledger accepted the event is part of the
evidence); the writer fixes it before it hashes. Every field is in an export row, so
the chain can be re-verified from an export alone.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, NamedTuple

from p402core import IMPLEMENTATION, load

VERSION = 2
GENESIS = "0" * 64


def encoder():
    """The core's ``event_bytes`` (compiled unless P402_NO_EXTENSIONS=1), looked up
    on first use so that importing the ledger never needs the compiled core: a
    server without it stops at start with its own message."""
    return load(IMPLEMENTATION).event_bytes


def canonical_bytes(ev: Any) -> bytes:
    """The canonical encoding of a LedgerEvent, or of anything with its attributes
    (one rebuilt from an export row with ``LedgerEvent.from_dict``)."""
    return encoder()(ev)


def chain_link(prev: bytes, canonical: bytes) -> bytes:
    """SHA-256(prev || canonical): the raw 32-byte chain hash (the writer's step)."""
    return hashlib.sha256(prev + canonical).digest()


def chain_step(prev_hex: str, ev: Any) -> str:
    """The chain hash (hex) of ``ev`` following the event whose chain hash is
    ``prev_hex`` (``GENESIS`` for the first event of a tenant)."""
    return hashlib.sha256(bytes.fromhex(prev_hex) + canonical_bytes(ev)).hexdigest()


class VerifyResult(NamedTuple):
    """The outcome of a chain walk.

    ``ok``: every event linked; ``count``: events checked (the last good position
    when not ok); ``head``: the last good chain hash (``GENESIS`` for none);
    ``first_bad_index``: the chain position where the chain breaks (None when ok);
    ``reason``: what is wrong there, in words (empty when ok)."""

    ok: bool
    count: int
    head: str
    first_bad_index: int | None = None
    reason: str = ""


class ChainVerifier:
    """An incremental chain walk: ``feed`` events in chain order (as stored, ordered
    by chain_index); it stops at the first break. ``result()`` says how it ended.

    A walk of part of a chain (an export of a time range) starts from the chain hash
    before its first event (``prev_hex``) and that event's position (``first_index``).

    What each kind of tampering looks like here: a modified event does not hash to its
    stored chain_hash; a deleted event leaves a gap in chain_index (or, when the later
    positions were renumbered, the next event does not link to the one before); an
    inserted or reordered event does not link to its predecessor; two events claiming
    one position are named as such."""

    __slots__ = ("_prev", "_encode", "head", "expected", "count", "failure")

    def __init__(self, *, prev_hex: str = GENESIS, first_index: int = 1):
        self._prev = bytes.fromhex(prev_hex)
        self._encode = encoder()
        self.head = prev_hex
        self.expected = first_index
        self.count = 0
        self.failure: VerifyResult | None = None

    def feed(self, ev: Any) -> bool:
        """Check the next event; False once the chain is broken (further events are
        ignored)."""
        if self.failure is not None:
            return False
        index, expected = ev.chain_index, self.expected
        if not index:
            return self._fail(expected, f"event {ev.event_id!r} has no chain position "
                                        "(inserted outside the ledger's writer)")
        if index < expected:
            return self._fail(index, f"chain_index {index} appears twice (event "
                                     f"{ev.event_id!r}): an event was inserted")
        if index > expected:
            return self._fail(expected, f"chain_index {expected} is missing (the next is "
                                        f"{index}): an event was deleted")
        digest = hashlib.sha256(self._prev + self._encode(ev)).digest()
        got = digest.hex()
        if got != ev.chain_hash:
            return self._fail(index, f"event {ev.event_id!r} at chain_index {index} does "
                                     "not match its chain hash: it was modified, or events "
                                     "were deleted, inserted or reordered here")
        self._prev, self.head = digest, got
        self.count += 1
        self.expected += 1
        return True

    def _fail(self, index: int, reason: str) -> bool:
        self.failure = VerifyResult(False, self.count, self.head, index, reason)
        return False

    def result(self) -> VerifyResult:
        return self.failure or VerifyResult(True, self.count, self.head)


def verify_events(
    events: Iterable[Any], *, prev_hex: str = GENESIS, first_index: int = 1
) -> VerifyResult:
    """Walk ``events`` in chain order and name the first position where the chain
    breaks (``ChainVerifier``)."""
    walker = ChainVerifier(prev_hex=prev_hex, first_index=first_index)
    for ev in events:
        if not walker.feed(ev):
            break
    return walker.result()


__all__ = [
    "VERSION",
    "GENESIS",
    "canonical_bytes",
    "encoder",
    "chain_link",
    "chain_step",
    "VerifyResult",
    "ChainVerifier",
    "verify_events",
]

"""Authentication and scopes: `authorization: Bearer <key>` metadata -> a `KeyInfo`.

Owns the scope sets of the RPCs (METER, READ, ADMIN, ANY) and `KeyCache`, the
in-memory cache that makes auth cost microseconds:

- Entries are keyed by the SHA-256 of the presented key (the plaintext is never
  kept). A hit younger than `revalidate_seconds` answers without touching the store;
  an older one is re-read through `store.find_key`, so a key revoked by another
  process stops working within that period.
- A revocation through this server (`revoke(key_id)`) drops the key's entries and
  bans its id at once: the very next call with it fails.
- Unknown keys are remembered for `negative_seconds` so a flood of bad keys is not a
  flood of store reads; concurrent misses of one key share one store read.
- The cache is bounded (`max_entries`); when full, the oldest entries go first.

Scopes (DESIGN §9): meter (Authorize, Record*, Release, Ping), read (Query,
ExportEvents, the admin reads, Ping), admin (everything).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict

from p402_server.wire.errors import permission_denied, unauthenticated

log = logging.getLogger("p402.server.auth")

METER = frozenset({"meter", "admin"})
READ = frozenset({"read", "admin"})
ADMIN = frozenset({"admin"})
ANY = frozenset({"meter", "read", "admin"})
SCOPE_NAMES = ("meter", "read", "admin")

_BEARER = "bearer "


def key_digest(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def bearer_key(context) -> str:
    """The key of the `authorization: Bearer …` metadata, or "" when absent."""
    for item in context.invocation_metadata() or ():
        if item[0] == "authorization":
            value = item[1]
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if value[:7].lower() == _BEARER:
                return value[7:].strip()
            return ""
    return ""


class KeyCache:
    """`authenticate(context, scopes, method)` -> KeyInfo, cached (module docstring)."""

    def __init__(self, store, *, revalidate_seconds: float = 5.0,
                 negative_seconds: float = 1.0, max_entries: int = 100_000,
                 clock=time.monotonic):
        self._store = store
        self._revalidate = revalidate_seconds
        self._negative = negative_seconds
        self._max = max_entries
        self._clock = clock
        # digest -> (KeyInfo | None, checked_at)
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._revoked_ids: set[str] = set()
        self.store_reads = 0  # observable in tests: hits must not read the store

    def authenticate(self, context, scopes: frozenset, method: str,
                     required: str = "admin"):
        """Awaitable KeyInfo of the call's `authorization: Bearer` key (the coroutine
        of `authenticate_key`: no frame of its own on every call)."""
        return self.authenticate_key(bearer_key(context), scopes, method, required)

    async def authenticate_key(self, api_key: str, scopes: frozenset, method: str,
                               required: str = "admin"):
        """`authenticate` for a key given as it is (a caller in this process)."""
        if not api_key:
            raise unauthenticated(
                "API_KEY_MISSING", "missing `authorization: Bearer <api key>` metadata")
        digest = key_digest(api_key)
        entry = self._entries.get(digest)
        now = self._clock()
        if entry is not None and now - entry[1] < (
                self._revalidate if entry[0] is not None else self._negative):
            info = entry[0]
        else:
            info = await self._lookup(digest, api_key)
        if info is None or info.key_id in self._revoked_ids:
            raise unauthenticated("API_KEY_INVALID", "unknown or revoked API key")
        if scopes.isdisjoint(info.scopes):
            raise permission_denied(required, method)
        return info

    async def _lookup(self, digest: bytes, api_key: str):
        fut = self._inflight.get(digest)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        try:
            self.store_reads += 1
            info = await self._store.find_key(api_key)
            if info is not None and info.revoked_ms is not None:
                info = None
            self._remember(digest, info)
            fut.set_result(info)
            return info
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._inflight[digest]

    def _remember(self, digest: bytes, info) -> None:
        entries = self._entries
        entries[digest] = (info, self._clock())
        entries.move_to_end(digest)
        while len(entries) > self._max:
            entries.popitem(last=False)

    def revoke(self, key_id: str) -> None:
        """A key was revoked through this server: refuse it from the next call on."""
        self._revoked_ids.add(key_id)
        for digest, (info, _) in list(self._entries.items()):
            if info is not None and info.key_id == key_id:
                del self._entries[digest]

    def clear(self) -> None:
        self._entries.clear()


def scope_names(scopes) -> list[str]:
    """Scopes in the canonical order (for listings and messages)."""
    return [s for s in SCOPE_NAMES if s in scopes]


__all__ = ["METER", "READ", "ADMIN", "ANY", "KeyCache", "bearer_key", "key_digest",
           "scope_names"]

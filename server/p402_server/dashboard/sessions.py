"""Dashboard sessions: a random cookie id -> a server-side session, and CSRF tokens.

Owns `Session` and `SessionStore`. The cookie carries only an unguessable id (32
random bytes); the tenant, key id and scopes live here, in memory, never in the
cookie, so a session cannot be forged or widened by the browser. The API key itself
is never kept: sign-in resolves it to its key id once, and from then on the session
is checked against the store's record of that key id (revocation ends it).

Expiry: a session ends after `idle_seconds` without a request or `max_seconds`
after sign-in, whichever comes first. The store is bounded (`max_sessions`; the
least recently used go first). Sessions do not survive a restart: signing in again
is the price of keeping no secrets on disk.
"""
from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field


def new_token() -> str:
    """32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (False when either is missing or not
    text). Any text compares, lone surrogates included (a header's undecodable bytes)."""
    if not a or not b or not isinstance(a, str) or not isinstance(b, str):
        return False
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"),
                               b.encode("utf-8", "surrogatepass"))


@dataclass(slots=True)
class Session:
    session_id: str
    tenant_id: str
    key_id: str
    key_prefix: str
    key_name: str
    scopes: frozenset[str]
    csrf_token: str
    created: float
    last_seen: float
    # When the key was last confirmed not revoked in the store (monotonic seconds).
    key_checked: float = 0.0
    flash: list[str] = field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


class SessionStore:
    """In-memory sessions (module docstring)."""

    def __init__(self, *, idle_seconds: float = 30 * 60, max_seconds: float = 12 * 3600,
                 max_sessions: int = 10_000, clock=time.monotonic):
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, *, tenant_id: str, key_id: str, key_prefix: str, key_name: str,
               scopes: frozenset[str]) -> Session:
        now = self._clock()
        s = Session(session_id=new_token(), tenant_id=tenant_id, key_id=key_id,
                    key_prefix=key_prefix, key_name=key_name, scopes=frozenset(scopes),
                    csrf_token=new_token(), created=now, last_seen=now, key_checked=now)
        self._sessions[s.session_id] = s
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return s

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (touching it), or None (expired ones go)."""
        if not session_id:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            return None
        now = self._clock()
        if now - s.last_seen > self.idle_seconds or now - s.created > self.max_seconds:
            del self._sessions[session_id]
            return None
        s.last_seen = now
        self._sessions.move_to_end(session_id)
        return s

    def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def end_key(self, key_id: str) -> int:
        """End every session of a key (revoked); returns how many ended."""
        gone = [sid for sid, s in self._sessions.items() if s.key_id == key_id]
        for sid in gone:
            del self._sessions[sid]
        return len(gone)

    def now(self) -> float:
        return self._clock()


__all__ = ["Session", "SessionStore", "new_token", "tokens_equal"]

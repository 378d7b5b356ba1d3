"""Privacy modes at the service (DESIGN §8): which mode a call runs under, whether
the tenant allows it, and what of its content survives.

Owns the privacy settings of a tenant (their defaults, validation and wire form),
the tenant's secrets (fingerprint salt, evidence key, gateway secrets: generated
on the tenant's first use, kept in the tenant's stored settings under
``"secrets"``, sealed with ``P402_SECRET_KEY`` when set, never returned by any
API, never logged) and ``TenantPrivacy``, the per-tenant object the runtime asks:

- ``resolve(requested)``: the request's mode, or the tenant's default for 0;
- ``allowed(mode)``: the tenant's allowed set (``allowed_privacy_modes``; empty =
  every mode but full_trace) plus any mode a PRIVACY policy rule names as allowed.
  full_trace is thus refused unless the tenant lists it or a rule allows it.
  Authorize answers DENY ``policy.privacy_mode_not_allowed`` (the provider is not
  called). A Record reports a call that happened and was charged, so it is not
  refused: its event is metered under metadata_only with that reason (the
  runtime's ``_record_mode``), keeping less than asked, never more;
- ``keep(mode, prompt, response)``: what is kept of the content (``Kept``):
  metadata_only — nothing (the text is dropped before the store and the logs);
  fingerprint_only and private_gateway — salted xxh3-128 fingerprints (hex);
  redacted_trace — fingerprints, plus the text after ``redaction.redact`` for the
  fields the tenant allows (``redacted_trace_fields``); full_trace — fingerprints
  and the text verbatim. Kept text expires after ``content_retention_days``.
- ``duplicate_of(owner_key, fingerprint, now_ms)``: the earlier event with the same
  prompt fingerprint for the same owner within ``duplicate_window_seconds``.

The owner of a duplicate is the event's whole owner tuple (all six dimensions
equal, absent = ""): a retry comes from the same customer, feature, workflow, …;
the same prompt from two features is two pieces of work, not a replay. Recent
fingerprints are remembered in memory (bounded); beyond memory (after a restart)
the store's ``find_duplicate`` (same rule) answers.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import NamedTuple

from p402_server.privacy.signing import new_evidence_key, seal, unseal
from p402core import InvalidArgument, PrivacyMode

METADATA_ONLY = int(PrivacyMode.METADATA_ONLY)
FINGERPRINT_ONLY = int(PrivacyMode.FINGERPRINT_ONLY)
REDACTED_TRACE = int(PrivacyMode.REDACTED_TRACE)
PRIVATE_GATEWAY = int(PrivacyMode.PRIVATE_GATEWAY)
FULL_TRACE = int(PrivacyMode.FULL_TRACE)

CONTENT_FIELDS = ("prompt", "response")
# Every mode but full_trace: keeping prompts verbatim is an explicit opt-in.
DEFAULT_ALLOWED = (METADATA_ONLY, FINGERPRINT_ONLY, REDACTED_TRACE, PRIVATE_GATEWAY)

PRIVACY_DEFAULTS = {
    "allowed_privacy_modes": [],
    "redacted_trace_fields": [],
    "content_retention_days": 30,
    "duplicate_window_seconds": 86_400,
    "signature_skew_seconds": 300,
}
SECRETS = "secrets"  # the settings key holding the tenant's secrets (never exported)
MAX_CONTENT_CHARS = 64 * 1024 * 1024
DEDUP_MEMORY = 100_000


def _names(modes) -> str:
    return ", ".join(PrivacyMode(m).name.lower() for m in modes)


def validate_settings(out: dict, prefix: str = "settings.") -> dict:
    """Check and normalise the privacy fields of a settings dict (in place)."""
    modes = []
    for m in out.get("allowed_privacy_modes") or ():
        m = int(m)
        if m not in (1, 2, 3, 4, 5):
            raise InvalidArgument(prefix + "allowed_privacy_modes",
                                  f"not a valid PrivacyMode: {m}")
        if m not in modes:
            modes.append(m)
    out["allowed_privacy_modes"] = sorted(modes)
    fields = []
    for f in out.get("redacted_trace_fields") or ():
        if f not in CONTENT_FIELDS:
            raise InvalidArgument(prefix + "redacted_trace_fields",
                                  f"unknown content field {f!r} (prompt, response)")
        if f not in fields:
            fields.append(f)
    out["redacted_trace_fields"] = fields
    bounds = {"content_retention_days": (1, 3650),
              "duplicate_window_seconds": (1, 366 * 86_400),
              "signature_skew_seconds": (1, 3600)}
    for name, (low, high) in bounds.items():
        value = out.get(name) or PRIVACY_DEFAULTS[name]
        if not low <= int(value) <= high:
            raise InvalidArgument(prefix + name, f"must be within {low}..{high}, got {value}")
        out[name] = int(value)
    default = int(out.get("default_privacy_mode") or METADATA_ONLY)
    allowed = out["allowed_privacy_modes"] or list(DEFAULT_ALLOWED)
    if default not in allowed:
        raise InvalidArgument(prefix + "default_privacy_mode",
                              f"{PrivacyMode(default).name.lower()} is not among the "
                              f"allowed modes ({_names(allowed)})")
    return out


def new_secrets() -> dict:
    """A tenant's secrets: the fingerprint salt and the evidence (Ed25519) key."""
    return {
        "fingerprint_salt": seal(os.urandom(32)),
        "evidence_key": seal(new_evidence_key()),
        "gateways": {},
    }


class Kept(NamedTuple):
    """What survives of a call's content under its privacy mode."""

    prompt_fingerprint: str | None
    response_fingerprint: str | None
    texts: tuple  # ((kind, text), …) to store in the contents table


NOTHING = Kept(None, None, ())


class TenantPrivacy:
    """One tenant's privacy state (module docstring). Rebuilt settings keep the
    in-memory duplicate memory via ``reconfigure``."""

    def __init__(self, tenant_id: str, settings: dict, core):
        self.tenant_id = tenant_id
        self.core = core
        self._recent: OrderedDict = OrderedDict()  # (owner_key, fp) -> (event_id, ms)
        self.reconfigure(settings)

    def reconfigure(self, settings: dict, rules=()) -> None:
        s = settings
        self.default_mode = int(s.get("default_privacy_mode") or METADATA_ONLY)
        allowed = set(s.get("allowed_privacy_modes") or DEFAULT_ALLOWED)
        self._settings_allowed = frozenset(allowed)
        self.redact_fields = frozenset(s.get("redacted_trace_fields") or CONTENT_FIELDS)
        self.retention_ms = int(s.get("content_retention_days")
                                or PRIVACY_DEFAULTS["content_retention_days"]) * 86_400_000
        self.window_ms = int(s.get("duplicate_window_seconds")
                             or PRIVACY_DEFAULTS["duplicate_window_seconds"]) * 1000
        self.skew_seconds = int(s.get("signature_skew_seconds")
                                or PRIVACY_DEFAULTS["signature_skew_seconds"])
        secrets = s.get(SECRETS) or {}
        salt = secrets.get("fingerprint_salt")
        self._fingerprinter = self.core.Fingerprinter(unseal(salt)) if salt else None
        self.set_rules(rules)

    def set_rules(self, rules) -> None:
        """Modes a PRIVACY policy rule allows count as explicitly allowed (the engine
        still applies each rule's match at Authorize)."""
        from_rules = set()
        for r in rules:
            if int(r.effect) == 8:  # Effect.PRIVACY
                from_rules.update(int(m) for m in r.allowed_privacy_modes)
        self.allowed_modes = self._settings_allowed | frozenset(from_rules)

    # --- modes ------------------------------------------------------------------

    def resolve(self, requested: int) -> int:
        return int(requested) or self.default_mode

    def allowed(self, mode: int) -> bool:
        return mode == self.default_mode or mode in self.allowed_modes

    # --- content ----------------------------------------------------------------

    def fingerprint(self, text: str | None) -> str | None:
        if not text or self._fingerprinter is None:
            return None
        return self._fingerprinter.fingerprint(text).hex()

    def keep(self, mode: int, prompt: str | None, response: str | None, *,
             prompt_fp: str | None = None) -> Kept:
        """What of the content to keep under `mode` (`prompt_fp`: the prompt's
        fingerprint taken at Authorize, when the Record carries no prompt)."""
        if mode == METADATA_ONLY or (not prompt and not response and not prompt_fp):
            return NOTHING
        pfp = self.fingerprint(prompt) if prompt else prompt_fp
        rfp = self.fingerprint(response)
        texts: list = []
        if mode == REDACTED_TRACE:
            from p402_server.privacy.redaction import redact

            for kind, text in (("prompt", prompt), ("response", response)):
                if text and kind in self.redact_fields:
                    texts.append((kind, redact(text).text))
        elif mode == FULL_TRACE:
            for kind, text in (("prompt", prompt), ("response", response)):
                if text:
                    texts.append((kind, text))
        return Kept(pfp, rfp, tuple(texts))

    # --- duplicates ---------------------------------------------------------------

    @staticmethod
    def owner_key(owners: tuple) -> str:
        """The whole owner tuple (module docstring)."""
        return "\x1f".join(owners)

    def remember(self, owner_key: str, fp: str, event_id: str, at_ms: int) -> None:
        key = (owner_key, fp)
        if key in self._recent:
            return  # the earliest stays the one later duplicates point at
        self._recent[key] = (event_id, at_ms)
        if len(self._recent) > DEDUP_MEMORY:
            self._recent.popitem(last=False)

    def recent_duplicate(self, owner_key: str, fp: str, now_ms: int) -> str | None:
        hit = self._recent.get((owner_key, fp))
        if hit is None:
            return None
        if now_ms - hit[1] > self.window_ms:
            del self._recent[(owner_key, fp)]
            return None
        return hit[0]


def redacted_settings(settings: dict) -> dict:
    """Settings without the secrets (for logs and anything shown)."""
    return {k: v for k, v in settings.items() if k != SECRETS}


__all__ = [
    "CONTENT_FIELDS",
    "DEFAULT_ALLOWED",
    "PRIVACY_DEFAULTS",
    "SECRETS",
    "Kept",
    "TenantPrivacy",
    "new_secrets",
    "validate_settings",
    "redacted_settings",
]

"""The redaction pass of privacy mode `redacted_trace` (DESIGN §8).

Owns the detectors and `redact(text) -> Redacted(text, counts)`: every secret or
personal identifier found is replaced by a typed placeholder (`[EMAIL]`,
`[CARD_NUMBER]`, `[OPENAI_KEY]`, …) and ordinary text around it is left byte for
byte as it was. What it finds:

| placeholder        | what                                                           |
|--------------------|----------------------------------------------------------------|
| PRIVATE_KEY        | PEM private key blocks (-----BEGIN … PRIVATE KEY-----)         |
| JWT                | JSON Web Tokens (eyJ….eyJ….sig)                                |
| BEARER_TOKEN       | `Bearer <token>` (the word and the token)                      |
| ANTHROPIC_KEY      | sk-ant-…                                                       |
| OPENAI_KEY         | sk-…, sk-proj-…, sk-svcacct-…, sk-admin-…                      |
| AWS_ACCESS_KEY     | AKIA… / ASIA… access key ids                                   |
| AWS_SECRET_KEY     | aws_secret_access_key = <40 chars>                             |
| GITHUB_TOKEN       | ghp_ gho_ ghu_ ghs_ ghr_ …, github_pat_…                       |
| GOOGLE_API_KEY     | AIza…                                                          |
| SLACK_TOKEN        | xoxb- xoxp- xoxa- xoxo- xoxr- xoxs-                            |
| STRIPE_KEY         | sk_live_ / rk_live_ / sk_test_ / rk_test_ …                    |
| EMAIL              | addresses                                                      |
| CARD_NUMBER        | 13–19 digits (spaces or dashes allowed) passing the Luhn check |
| IBAN               | IBANs passing the ISO 13616 mod-97 check                       |
| US_SSN             | ddd-dd-dddd, minus the ranges the SSA never issues             |
| UK_NINO            | UK National Insurance numbers (HMRC prefix rules)              |
| CA_SIN             | Canadian Social Insurance Numbers ddd-ddd-ddd passing Luhn     |
| IPV6 / IPV4        | addresses (validated by `ipaddress`)                           |
| PHONE              | +country or 10–15 digit numbers in common groupings            |

National ids beyond the US and UK: the Canadian SIN (a checksummed, widely
leaked id in North American support text) and the IBAN (the account number
European users paste into billing questions; a national-format bank id with a
check that keeps false positives rare).

Near misses are kept on purpose: a 16-digit number failing Luhn, an SSN in a
never-issued range, `999.1.1.1`, dates, versions, short `sk-` words. Detectors
that carry a checksum run it; a candidate that fails is left untouched and the
scan moves past it.

Linear time: all detectors are one compiled alternation run by one `re.sub`.
Every repeated class is bounded and every alternative that starts with a
repetition is anchored by a look-behind that refuses to start inside a run of
the same characters, so each run is scanned a bounded number of times: the cost
is O(len(text)) whatever the input (a test feeds adversarial runs).
"""
from __future__ import annotations

import ipaddress
import re
from typing import Callable, NamedTuple

KINDS = (
    "PRIVATE_KEY", "JWT", "BEARER_TOKEN", "ANTHROPIC_KEY", "OPENAI_KEY",
    "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "GITHUB_TOKEN", "GOOGLE_API_KEY",
    "SLACK_TOKEN", "STRIPE_KEY", "EMAIL", "CARD_NUMBER", "IBAN", "US_SSN",
    "UK_NINO", "CA_SIN", "IPV6", "IPV4", "PHONE",
)

# Order matters where alternatives can start at the same position: the more
# specific first (sk-ant- before sk-, JWT before anything token-like, card
# numbers before phones).
_PATTERNS: tuple[tuple[str, str], ...] = (
    ("PRIVATE_KEY",
     r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY-----"
     r"[A-Za-z0-9+/=\s:,.-]{0,16384}?"
     r"-----END (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY-----"),
    ("JWT",
     r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,4096}\.[A-Za-z0-9_-]{4,8192}"
     r"\.[A-Za-z0-9_-]{8,4096}"),
    ("BEARER_TOKEN",
     r"(?<![A-Za-z0-9])[Bb][Ee][Aa][Rr][Ee][Rr][ \t]{1,8}[A-Za-z0-9._~+/=-]{8,4096}"),
    ("ANTHROPIC_KEY", r"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_-]{16,512}"),
    ("OPENAI_KEY",
     r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{20,512}"),
    ("AWS_ACCESS_KEY", r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"),
    ("AWS_SECRET_KEY",
     r"(?i:aws_?secret_?(?:access_?)?key)[\"']?[ \t]{0,8}[:=][ \t]{0,8}[\"']?"
     r"[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
    ("GITHUB_TOKEN",
     r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{22,255})"),
    ("GOOGLE_API_KEY", r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"),
    ("SLACK_TOKEN", r"(?<![A-Za-z0-9-])xox[abposr]-[A-Za-z0-9-]{10,255}"),
    ("STRIPE_KEY", r"(?<![A-Za-z0-9_])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,255}"),
    ("EMAIL",
     r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@"
     r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}"
     r"(?![A-Za-z0-9-])"),
    ("IBAN",
     r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"),
    ("US_SSN", r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"),
    ("CA_SIN", r"(?<![\d-])\d{3}[- ]\d{3}[- ]\d{3}(?![\d-])"),
    ("CARD_NUMBER", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"),
    ("UK_NINO",
     r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
     r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])"),
    ("IPV6",
     r"(?<![0-9A-Fa-f:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}"
     r"|[0-9A-Fa-f]{1,4})?(?![0-9A-Fa-f:]|\.\d)"),
    ("IPV4", r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d]|\.\d)"),
    ("PHONE",
     r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"
     r"(?:[ .-]?\d{2,4}){1,5}(?![\w])"),
)

_COMBINED = re.compile("|".join(f"(?P<{k}>{p})" for k, p in _PATTERNS))
_NON_DIGIT = re.compile(r"\D")
_ISO_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}")


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(s: str) -> bool:
    digits = _NON_DIGIT.sub("", s)
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    # Mixed separators ("4111 1111-1111") are not how anyone writes a card number.
    if " " in s and "-" in s:
        return False
    return luhn_ok(digits)


def _iban(s: str) -> bool:
    compact = s.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:
        return False
    return number % 97 == 1


def _ssn(s: str) -> bool:
    area, group, serial = s.split("-")
    return not (area in ("000", "666") or area[0] == "9" or group == "00"
                or serial == "0000")


def _sin(s: str) -> bool:
    digits = _NON_DIGIT.sub("", s)
    return digits[0] not in "08" and luhn_ok(digits)


def _ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _phone(s: str) -> bool:
    if _ISO_DATE.match(s):
        return False
    digits = len(_NON_DIGIT.sub("", s))
    if s.startswith("+"):
        return 8 <= digits <= 15
    return 10 <= digits <= 15


_CHECKS: dict[str, Callable[[str], bool]] = {
    "CARD_NUMBER": _card,
    "IBAN": _iban,
    "US_SSN": _ssn,
    "CA_SIN": _sin,
    "IPV6": _ipv6,
    "IPV4": _ipv4,
    "PHONE": _phone,
}


class Redacted(NamedTuple):
    """A redacted text and how many of each kind were replaced."""

    text: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def redact(text: str) -> Redacted:
    """Replace every secret and identifier in `text` by its typed placeholder."""
    if not isinstance(text, str):
        raise TypeError(f"redact() needs a str, not {type(text).__name__}")
    counts: dict[str, int] = {}

    def repl(m: re.Match) -> str:
        kind = m.lastgroup
        found = m.group()
        check = _CHECKS.get(kind)
        if check is not None and not check(found):
            return found  # a near miss: kept as written
        counts[kind] = counts.get(kind, 0) + 1
        return f"[{kind}]"

    return Redacted(_COMBINED.sub(repl, text), counts)


__all__ = ["KINDS", "Redacted", "redact", "luhn_ok"]

"""The redaction pass of redacted_trace (server/p402_server/privacy/redaction.py): a corpus of
planted secrets of every kind, none of which may survive, with the ordinary text
around them intact and near misses (failing checksums, never-issued ranges) kept."""
from __future__ import annotations

import pytest

from p402_server.privacy.redaction import KINDS, luhn_ok, redact

# (kind, planted secret). Every kind of KINDS appears at least once.
PLANTED = [
    ("EMAIL", "jane.doe+billing@example.co.uk"),
    ("EMAIL", "ops@sub.example.org"),
    ("PHONE", "+1 415-555-0132"),
    ("PHONE", "+44 20 7946 0958"),
    ("PHONE", "(415) 555-0199"),
    ("CARD_NUMBER", "4111 1111 1111 1111"),
    ("CARD_NUMBER", "5500-0000-0000-0004"),
    ("CARD_NUMBER", "378282246310005"),
    ("US_SSN", "123-45-6789"),
    ("UK_NINO", "AB 12 34 56 C"),
    ("UK_NINO", "JG103759A"),
    ("CA_SIN", "130-000-003"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN", "DE89370400440532013000"),
    ("OPENAI_KEY", "sk-abcdefghijklmnopqrstuvwxyzABCDEF012345"),
    ("OPENAI_KEY", "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-xyz"),
    ("ANTHROPIC_KEY", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789"),
    ("AWS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE"),
    ("AWS_SECRET_KEY", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("GITHUB_TOKEN", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("GITHUB_TOKEN", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("GOOGLE_API_KEY", "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234"),
    ("SLACK_TOKEN", "xoxb-123456789012-abcdefghijklmnop"),
    ("STRIPE_KEY", "sk_live_abcdefghijklmnop1234"),
    ("STRIPE_KEY", "rk_test_ABCDEFGHIJKLMNOP5678"),
    ("BEARER_TOKEN", "Bearer abc.def-ghi_123456789"),
    ("JWT", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0."
            "dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
    ("IPV4", "192.168.10.254"),
    ("IPV6", "2001:db8::8a2e:370:7334"),
    ("IPV6", "::ffff:10.0.0.1"),
    ("PRIVATE_KEY", "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX"
                    "6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwEC"
                    "AwEAAQ==\n-----END RSA PRIVATE KEY-----"),
]

# Ordinary text that must come out unchanged, including near misses.
KEPT = [
    "Please summarise the quarterly report for the board.",
    "Total $12.50 for order 12345 on 2024-01-15 at 12:30:45.",
    "card 4111 1111 1111 1112 fails Luhn",          # invalid Luhn: kept
    "000-12-3456 and 666-12-3456 are never issued",  # SSN ranges never issued
    "999.1.1.1 is not an address; version 1.2.3 neither",
    "scikit-learn (sk-learn) and sk-short are words",
    "user at example dot com",
    "GB00 WEST 1234 5698 7654 32 fails mod-97",
    "call extension 1234 or room 555-1234",
    "the bearer of bad news",
]


def test_every_kind_is_planted():
    assert {k for k, _ in PLANTED} == set(KINDS)


@pytest.mark.parametrize("kind,secret", PLANTED, ids=[f"{k}-{i}" for i, (k, _) in
                                                      enumerate(PLANTED)])
def test_each_planted_secret_is_replaced_by_its_placeholder(kind, secret):
    text = f"before «{secret}» after"
    r = redact(text)
    assert secret not in r.text
    assert r.text == f"before «[{kind}]» after"
    assert r.counts == {kind: 1}


def test_corpus_none_survives_and_ordinary_text_does():
    parts = []
    for i, (_kind, secret) in enumerate(PLANTED):
        parts.append(KEPT[i % len(KEPT)])
        parts.append(f"Secret number {i}: {secret}.")
    corpus = "\n".join(parts)
    r = redact(corpus)
    for _kind, secret in PLANTED:
        assert secret not in r.text
    for line in KEPT:
        assert line in r.text
    assert r.total == len(PLANTED)
    for i in range(len(PLANTED)):
        assert f"Secret number {i}: [" in r.text


@pytest.mark.parametrize("text", KEPT)
def test_near_misses_and_plain_text_are_kept(text):
    r = redact(text)
    assert r.text == text and r.counts == {}


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_adversarial_runs_complete():
    # Long runs of the characters the detectors repeat over: look-behind anchors keep
    # the scan linear; a quadratic pattern would not finish in the test's lifetime.
    for chunk in ("a", "1", "1.", ":", "a@", "eyJ", "1 ", "a.", "sk-", "A"):
        text = chunk * (200_000 // len(chunk))
        assert len(redact(text).text) > 0


def test_non_str_is_refused():
    with pytest.raises(TypeError):
        redact(b"bytes")  # type: ignore[arg-type]

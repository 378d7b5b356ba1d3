"""Fingerprints: canonical content, salting, structure, twin equality."""
from __future__ import annotations

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from p402core._enums import InvalidArgument

SALT = bytes(range(16))
OTHER_SALT = bytes(range(1, 17))


@pytest.fixture
def fp(impl):
    """The fingerprint module of the twin under test."""
    return impl.module("fingerprint")


def test_digest_is_16_bytes_and_deterministic(fp):
    f = fp.Fingerprinter(SALT)
    d = f.fingerprint("hello")
    assert isinstance(d, bytes) and len(d) == 16
    assert f.fingerprint("hello") == d == fp.fingerprint(SALT, "hello")
    assert fp.Fingerprinter(bytearray(SALT)).fingerprint("hello") == d
    assert f.fingerprint("hello!") != d


def test_definition_is_pinned(fp):
    """The digest is the documented construction, computed here independently:
    seed = xxh3_64(salt); xxh3_128(u64le(len salt) + salt + domain tag + payload)."""
    seed = xxhash.xxh3_64_intdigest(SALT)
    prefix = len(SALT).to_bytes(8, "little") + SALT
    assert fp.fingerprint(SALT, "a b") == xxhash.xxh3_128_digest(prefix + b"\x00a b", seed=seed)
    msgs = [{"role": "user", "content": "hi"}]
    structured = (b"\x01" + b"l" + (1).to_bytes(8, "little") + b"d" + (2).to_bytes(8, "little")
                  + b"s" + (7).to_bytes(8, "little") + b"content"
                  + b"s" + (2).to_bytes(8, "little") + b"hi"
                  + b"s" + (4).to_bytes(8, "little") + b"role"
                  + b"s" + (4).to_bytes(8, "little") + b"user")
    assert fp.canonical_bytes(msgs) == structured
    assert fp.fingerprint(SALT, msgs) == xxhash.xxh3_128_digest(prefix + structured, seed=seed)


@pytest.mark.parametrize("a, b", [
    ("line one\r\nline two\r\n", "line one\nline two\n"),
    ("old mac\rline", "old mac\nline"),
    ("trailing   \nspaces\t\t\nend  ", "trailing\nspaces\nend"),
    ("caf\u00e9", "cafe\u0301"),                       # NFC: precomposed == decomposed
    ("x \r\n y\u00a0\r\n", "x\n y\n"),                 # NBSP is whitespace too
    ("text", b"text"),                                 # a str and its UTF-8 bytes agree
    ("caf\u00e9 \r\n", "caf\u00e9\n".encode()),
])
def test_canonicalization_makes_equal(fp, a, b):
    f = fp.Fingerprinter(SALT)
    assert f.fingerprint(a) == f.fingerprint(b)


@pytest.mark.parametrize("a, b", [
    ("a\n", "a"),                        # trailing empty lines are content
    ("  indented", "indented"),          # leading whitespace is content
    ("a\n\nb", "a\nb"),
    ("Hello", "hello"),
    (b"a\r\n", b"a\n"),                  # bytes are taken as is
    (b"a ", b"a"),
    ("a", ["a"]),                        # raw and structured never collide
    ("a", [{"role": "user", "content": "a"}]),
    (b"\x01l", ["x"]),
])
def test_different_content_differs(fp, a, b):
    f = fp.Fingerprinter(SALT)
    assert f.fingerprint(a) != f.fingerprint(b)


def test_salt_changes_digest(fp):
    assert fp.fingerprint(SALT, "same") != fp.fingerprint(OTHER_SALT, "same")
    # the whole salt counts, not just a 64-bit seed taken from it
    long_a, long_b = b"k" * 40 + b"a", b"k" * 40 + b"b"
    assert fp.fingerprint(long_a, "same") != fp.fingerprint(long_b, "same")


@pytest.mark.parametrize("salt", [b"", b"short", b"x" * 15, "a string salt of 32 characters..", None])
def test_salt_must_be_16_bytes(fp, salt):
    with pytest.raises(InvalidArgument) as err:
        fp.Fingerprinter(salt)
    assert err.value.field == "salt"
    with pytest.raises(InvalidArgument):
        fp.fingerprint(salt, "x")


def test_message_splits_do_not_collide(fp):
    f = fp.Fingerprinter(SALT)
    variants = [
        [{"role": "user", "content": "ab"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": ["a", "b"]}],
        [{"role": "user", "content": [{"type": "text", "text": "ab"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "a"},
                                      {"type": "text", "text": "b"}]}],
        [{"role": "usera", "content": "b"}],
        [{"role": "user", "content": "a", "name": "b"}],
        [{"role": "user", "content": ""}, {"role": "user", "content": "ab"}],
        [{"role": "assistant", "content": "ab"}],
        [{"role": "user", "content": "ab"}, {}],
    ]
    digests = [f.fingerprint(v) for v in variants]
    assert len(set(digests)) == len(variants)


def test_messages_are_canonical_inside(fp):
    f = fp.Fingerprinter(SALT)
    a = [{"role": "user", "content": "hi  \r\nthere"}, {"content": "ok", "role": "assistant"}]
    b = [{"content": "hi\nthere", "role": "user"}, {"role": "assistant", "content": "ok"}]
    assert f.fingerprint(a) == f.fingerprint(b)
    assert f.fingerprint(tuple(a)) == f.fingerprint(a)


@pytest.mark.parametrize("content", [
    42, None, 1.5, {1, 2}, object(),
    [{"role": "user", "content": object()}],
    [{1: "non-str key"}],
])
def test_bad_content_is_invalid_argument(fp, content):
    with pytest.raises(InvalidArgument) as err:
        fp.fingerprint(SALT, content)
    assert err.value.field == "content"


def test_depth_is_bounded(fp):
    deep = "x"
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidArgument) as err:
        fp.fingerprint(SALT, deep)
    assert err.value.field == "content"


def test_repr_hides_the_salt(fp):
    assert SALT.hex() not in repr(fp.Fingerprinter(SALT))
    assert "\\x00\\x01" not in repr(fp.Fingerprinter(SALT))


# -- twins agree ----------------------------------------------------------------------

# pieces chosen to hit every branch of canonicalization: CR/LF, whitespace
# (incl. Unicode), NFC changes (decomposed, singleton U+212B), astral, lone surrogate
text = st.lists(st.sampled_from(
    list("ab \t\r\n") + ["\u00e9", "e\u0301", "\u00a0", "\u2028", "\x0b", "\u212b", "\U0001f600",
                         "\ud800", "\u2000"]), max_size=30).map("".join)
json_like = st.recursive(
    st.one_of(text, st.binary(max_size=8), st.integers(-10**20, 10**20), st.booleans(),
              st.none(), st.floats(allow_nan=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(text, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(content=st.one_of(text, st.binary(max_size=40), st.lists(json_like, max_size=4),
                         st.dictionaries(text, json_like, max_size=3)))
def test_twins_agree(both, content):
    py, c = (impl.module("fingerprint") for impl in both)
    assert py.canonical_bytes(content) == c.canonical_bytes(content)
    assert py.fingerprint(SALT, content) == c.fingerprint(SALT, content)
    if isinstance(content, str):
        assert py.canonical_text(content) == c.canonical_text(content)


@settings(max_examples=200, deadline=None)
@given(text=text)
def test_canonical_text_is_idempotent_and_matches_definition(both, text):
    for impl in both:
        canon = impl.module("fingerprint").canonical_text
        once = canon(text)
        assert canon(once) == once
        assert "\r" not in once
        assert all(line == line.rstrip() for line in once.split("\n"))


def test_compiled_twin_is_really_compiled(both):
    py, c = (impl.module("fingerprint") for impl in both)
    assert c.__file__.endswith((".so", ".pyd")) and py.__file__.endswith(".py")


@pytest.mark.parametrize("text", [
    "", "\n", "a\n", "a \n", "a\t", "a\xa0", "a\x85", "a\x85\nb", "\xe9\n", " \n\n",
    "a\nb \nc", "a\n\nb", "\x1c\n", "x" * 5000 + " \n" + "y", "\u2028", "a\u2028\n",
    "e\u0301\n", "\u212b",
])
def test_fast_path_boundaries(both, text):
    py, c = (impl.module("fingerprint") for impl in both)
    assert c.canonical_text(text) == py.canonical_text(text)
    assert c.fingerprint(SALT, text) == py.fingerprint(SALT, text)


def test_compiled_keeps_canonical_text_as_is(both):
    """The compiled twin's one-pass check recognizes canonical text (no copy)."""
    c = both[1].module("fingerprint")
    for text in ("plain", "two\nlines\n", "caf\u00e9\n" * 100, "emoji \U0001f600 ok\n"):
        assert c.canonical_text(text) is text

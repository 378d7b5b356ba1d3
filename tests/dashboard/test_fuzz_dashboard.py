"""Hostile HTTP to the dashboard (hypothesis), signed in as either tenant or signed out.

GET on every route, with generated query parameters for every field the code reads
(range, from, until and odd times; owner, model and provider values with NUL,
control characters, lone surrogates, markup and 10 KB of text; repeated parameters;
page tokens that are garbage, base64 of garbage or tampered real ones; after_seq,
places and page sizes of 0, -1, 2^63, '²'; unknown format and group-by values), odd
path segments (event ids and statement periods: '..', '%00', very long, another
tenant's real event id) and odd headers (Accept, Cookie with garbage, another
tenant's session or bytes that are not UTF-8, If-None-Match, Range); and POST
sign-in and sign-out with odd form bodies (no CSRF token, odd keys, odd charsets,
bytes that are not UTF-8, multipart files where text is expected).

Oracle: every answer is below 500; a 400 from the dashboard names the parameter (an
HTML page for pages, JSON for /api/events); nothing logged carries a traceback; an
answer to one tenant's session holds none of the other tenant's data, and a
signed-out answer none of either's; and no HTML answer holds generated markup as it
was sent.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
from urllib.parse import quote, unquote

import aiohttp
import pytest
from dash_harness import _start, close, csrf_of, md, seed, sign_in
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from p402.v1 import admin_pb2, common_pb2, meter_pb2
from p402_server.ledger.queries import encode_token
from tests.support.live_loop import on_a_loop

EXAMPLES = int(os.environ.get("P402_DASHBOARD_FUZZ_EXAMPLES", "500"))
XSS = ("<script>p402xss</script>", '"><img src=x onerror=p402xss>')
STATEMENT_PERIOD = "2026-09"


async def _session_of(base: str, key: str) -> tuple[str, str]:
    """(session cookie value, the session's CSRF token) of a fresh sign-in."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await sign_in(http, base, key)
        async with http.get(base + "/dashboard/statements") as r:
            token = csrf_of(await r.text())
        jar = {c.key: c.value for c in http.cookie_jar}
    return jar["p402_session"], token


async def _rig(tmp):
    d = await _start(tmp)
    await seed(d)
    # A closed statement of tenant A, so statement pages have something to find.
    await d.meter.Record(meter_pb2.RecordRequest(
        model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme", feature="chat"),
        usage=common_pb2.Usage(input_tokens=5000, output_tokens=400),
        event_time_ms=1_788_912_000_000), metadata=md(d.a.admin_key))
    await d.admin.CloseStatements(admin_pb2.CloseStatementsRequest(
        period=STATEMENT_PERIOD, customer="acme"), metadata=md(d.a.admin_key))
    sessions = {"A": await _session_of(d.base, d.a.read_key),
                "A-admin": await _session_of(d.base, d.a.admin_key),
                "B": await _session_of(d.base, d.b.read_key)}

    async def stop():
        await close(d)

    return (d, sessions), stop


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashfuzz")
    # SQLite's driver logs every statement at DEBUG: noise that only slows the run.
    quiet = logging.getLogger("aiosqlite")
    level = quiet.level
    quiet.setLevel(logging.INFO)
    try:
        with on_a_loop(lambda: _rig(tmp)) as (loop, (d, sessions), logs):
            yield {"d": d, "sessions": sessions, "loop": loop, "logs": logs}
    finally:
        quiet.setLevel(level)


# --- generated values --------------------------------------------------------------

STRINGS = ["", " ", "\x00", "a\x00b", "\x01", "\x7f", "\x85", "\n", "\r\n", "\t",
           "\ud800", "a\udfffb", "é" * 300, "x" * 10_000, "y" * 257, "acme", " acme ",
           "beta-secret-customer", "ev-beta-only", "🙂", "%00", "%ED%A0%80", "../../",
           "&", "=", "+", "#", *XSS]
TIMES = ["²", "٣", "１", "1e999", str(2**63), str(-(2**63)), "-1", "0", "nan", "inf",
         "1700000000000", "9999-12-31T23:59", "9999-12-31T23:59:59", "0001-01-01T00:00",
         "1969-12-31T23:59", "1970-01-01T00:00", "1970-01-01T00:01", "2025-02-30T00:00",
         "2025-13-01T00:00", "2024-02-29T24:00", "2026-05-04T13:07", "2026-05-04T13:07:99",
         "٢٠٢٦-٠٥-٠٤T١٣:٠٧", "2026-05-04 13:07", "2026-05-04T13:07Z", "2026-05-04",
         "+2026-05-04T13:07", "2026-05-04T13:07:00.5"]
RANGES = ["1h", "24h", "7d", "30d", "90d", "", "1y", "²", "30D", "-1h"]
ENUMS = ["success", "timeout", "deny", "allow", "reported", "measured", "unspecified",
         "SUCCESS", "0", "3", "-1", "²"]
INTS = ["0", "-1", "1", "2", "9", "10", str(2**31), str(2**63 - 1), str(2**63), str(2**64),
        "9" * 40, "²", "٣", "１", " 1", "1 ", "1.5", "1e3", "", "0x10", "+1", "00"]
WORDS = ["csv", "jsonl", "focus", "json", "html", "xml", "CSV", "day", "hour", "customer",
         "model", "tenant", "2026-09", "nope"]
NEXTS = ["/dashboard/spend", "/dashboard/", "//evil.example", "https://evil.example/",
         "/dashboard/signin", "/dashboard\\..\\x", "/dashboard/x\r\nSet-Cookie: a=b",
         "/dashboard/x\x00", "/dashboard/<script>p402xss</script>", "javascript:alert(1)"]


def _tokens():
    kinds = st.sampled_from(["ed", "ea", "s", "", "x", "ed:ed", "é"])
    positions = st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**40])
    real = st.builds(encode_token, kinds, positions)
    tampered = real.flatmap(lambda t: st.sampled_from(
        [t + "=", t + "A", t[:-1], t.upper(), "=" + t, t + "%00", t + "é", t[::-1]]))
    garbage_b64 = st.binary(max_size=24).map(lambda b: base64.urlsafe_b64encode(b).decode())
    return st.one_of(real, tampered, garbage_b64, st.sampled_from(STRINGS + INTS),
                     st.text(max_size=20))


def _odd(extra: list[str]):
    return st.one_of(st.sampled_from(extra), st.sampled_from(extra), st.sampled_from(STRINGS),
                     st.text(max_size=16))


OWNERS = ("customer", "feature", "department", "employee", "workflow")
PARAMS = {
    "range": _odd(RANGES),
    "from": _odd(TIMES), "until": _odd(TIMES), "since": _odd(TIMES),
    **{k: _odd(["acme", "globex", "beta-secret-customer"]) for k in OWNERS},
    "model": _odd(["gpt-4o-mini"]), "provider": _odd(["openai"]),
    "label": _odd(["team:x"]), "labels": _odd(["a=b"]),
    "outcome": _odd(ENUMS), "decision": _odd(ENUMS), "evidence": _odd(ENUMS),
    "page_token": _tokens(),
    "after_seq": _odd(INTS), "places": _odd(INTS), "page_size": _odd(INTS),
    "signed_out": _odd(INTS),
    "format": _odd(WORDS), "group_by": _odd(WORDS), "bucket": _odd(WORDS),
    "period": _odd(WORDS),
    "tenant": _odd(["TENANT_A", "TENANT_B"]),
    "next": _odd(NEXTS),
}
# A parameter with an odd name, or a value sent as raw percent-encoded bytes.
RAW_VALUES = ["%ED%A0%80", "%FF", "%C3", "%C3%28", "%F4%90%80%80", "%", "%%", "%zz",
              "a+b", "%2B", "%26", "%3D"]


FILTERS = ["range", "from", "until", *OWNERS, "model", "provider", "outcome", "decision",
           "evidence"]
# The parameters each route reads, chosen most often for it.
READS = {"/dashboard/meter/events": [*FILTERS, "page_token"],
         "/dashboard/api/events": [*FILTERS, "after_seq", "places", "after_seq", "places"],
         "/dashboard/spend": FILTERS, "/dashboard/export": [*FILTERS, "format"],
         "/dashboard/statements/{}": ["customer", "format"],
         "/.well-known/p402-keys.json": ["tenant"], "/dashboard/signin": ["next", "signed_out"]}


def _query_items(route: str):
    names = st.one_of(st.sampled_from(READS.get(route, sorted(PARAMS))),
                      st.sampled_from(sorted(PARAMS)))
    named = names.flatmap(lambda k: PARAMS[k].map(lambda v: (k, v)))
    raw = st.tuples(st.sampled_from(sorted(PARAMS)), st.sampled_from(RAW_VALUES)).map(
        lambda kv: (kv[0], RawValue(kv[1])))
    odd_name = st.tuples(st.sampled_from(["", "\x00", "%ED%A0%80", "a" * 300, "customer[]",
                                          "Customer", "CUSTOMER"]), st.sampled_from(STRINGS))
    return st.lists(st.one_of(named, named, named, raw, odd_name), max_size=4)


class RawValue(str):
    """A value put in the request line as it is (already percent-encoded)."""


def enc(v) -> str:
    if isinstance(v, RawValue):
        return str(v)
    if isinstance(v, bytes):
        return quote(v, safe="")
    return quote(v.encode("utf-8", "surrogatepass"), safe="")


SEGMENTS = ["..", "%2e%2e", "%00", "%ED%A0%80", "%FF", "x" * 5000, "y" * 300, "ev-first",
            "ev-retry", "ev-beta-only", "EV-BETA-ONLY", "ev-beta-only%00", "2026-09",
            "2025-02", "2025-13", "2025-00", "0000-01", "9999-12", "2026-9", "٢٠٢٦-٠٩",
            "2026-09%00", "2026-09.json", "%3Cscript%3Ep402xss%3C%2Fscript%3E",
            "dashboard.js", "favicon.svg", "..%2F..%2Fapp.py", "%2e%2e%2fapp.py", "",
            "%20", "a%2Fb", "ev-first;x", "ev-first%3Bx"]
ROUTES = ["/dashboard/meter/events", "/dashboard/api/events", "/dashboard/spend",
          "/dashboard/export", "/dashboard/statements", "/dashboard/signin", "/",
          "/dashboard", "/dashboard/", "/favicon.ico", "/.well-known/p402-keys.json",
          "/metrics", "/dashboard/meter/events/{}", "/dashboard/statements/{}",
          "/dashboard/static/{}"]
# The parameter a route's 400 may name although the request did not send it.
PATH_PARAMS = {"/dashboard/meter/events/{}": "event_id",
               "/dashboard/statements/{}": "period", "/.well-known/p402-keys.json": "tenant"}


def _segment():
    return st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=20).map(enc))


# Mostly signed in (a page's filters are read only then), sometimes not, or oddly.
COOKIES = ["A"] * 8 + ["A-admin"] * 3 + ["B"] * 4 + [
    "", "garbage", "A;garbage", "A;B", "B;A", "A;A", "signin", "bytes"]
HEADER_BYTES = [b"", b"*/*", b"text/html", b"application/json", b"\x00", b"\xff\xfe",
                b"x" * 9000, b'"abc"', b"W/\"x\"", b"*", b"bytes=0-1", b"bytes=9-1",
                b"bytes=-0", b"bytes=0-1,0-1,0-1", b"\xed\xa0\x80", b"text/html;q=\xff",
                b"Thu, 01 Jan 1970 00:00:00 GMT", b"tomorrow", "é".encode("latin-1")]


def _cookie(choice: str, sessions: dict) -> bytes:
    parts = {
        "": [], "garbage": [b"p402_session=\xff\xfe garbage"],
        "signin": [b"p402_signin=\xed\xa0\x80; p402_session=" + b"z" * 5000],
        "bytes": [b"p402_session=\xc3\x28", b'p402_signin="\\\x00'],
    }.get(choice)
    if parts is None:
        parts = [b"p402_session=" + sessions[who][0].encode() if who != "garbage"
                 else b"p402_session=;;=;" for who in choice.split(";")]
    return b"; ".join(parts)


# --- the wire ----------------------------------------------------------------------


def send(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; (status, headers, body, dechunked)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


def markers(d) -> dict[str, list[str]]:
    """Text that only the tenant's own data holds."""
    return {"A": [*d.a.event_ids, "globex", "initech", "acme-month", d.a.tenant_id,
                  "Acme Corp"],
            "B": ["ev-beta-only", "beta-secret-customer", d.b.tenant_id, "Beta LLC"]}


def check(live, path: str, sent: list[str], cookie_choice: str, status: int,
          headers: dict, body: bytes, names: list[str]) -> None:
    d = live["d"]
    text = body.decode("utf-8", "replace")
    ctype = headers.get("content-type", "")
    records, live["logs"].records[:] = list(live["logs"].records), []
    failures = [f"{r.name}: {r.getMessage()[:200]} {r.exc_info[1]!r}"[:400] for r in records
                if r.exc_info is not None]
    assert status < 500, (status, path[:200], text[:300], failures)
    ours = "content-security-policy" in headers  # answered by the dashboard, not the parser
    if status == 400 and ours:
        assert any(n and n in text for n in names), (path[:200], text[:300])
        route = path.split("?", 1)[0]
        if route == "/dashboard/api/events":
            assert ctype.startswith("application/json"), (path[:200], ctype)
            assert json.loads(text)["field"] in names, text[:300]
        elif route.startswith("/dashboard/") and not route.startswith("/dashboard/static/"):
            assert ctype.startswith("text/html"), (path[:200], ctype, text[:300])
    if ctype.startswith("text/html"):
        for x in XSS:
            assert x not in text, (path[:200], text[:300])
    # Another tenant's data: never in a tenant's answer, nor a signed-out one.
    who = {w.split("-")[0] for w in cookie_choice.split(";") if w in live["sessions"]}
    if not path.startswith("/metrics") and len(who) < 2:
        for tenant, marks in markers(d).items():
            if tenant in who:
                continue
            for m in marks:
                if any(m in s for s in sent):
                    continue  # reflected input, not data
                assert m not in text, (tenant, m, cookie_choice, path[:200], text[:300])
    assert not failures, (path[:200], failures)


# --- GET ---------------------------------------------------------------------------


def _header(name: bytes, value: bytes | None) -> bytes:
    return b"" if value is None else name + b": " + value + b"\r\n"


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(request=("/dashboard/api/events", [("after_seq", "²")]), segment="", cookie="A",
         accept=None, inm=None, rng=None)
@example(request=("/dashboard/api/events", [("after_seq", str(2**63))]), segment="",
         cookie="A", accept=None, inm=None, rng=None)
@example(request=("/dashboard/api/events", [("places", "٣")]), segment="", cookie="A",
         accept=None, inm=None, rng=None)
@example(request=("/dashboard/meter/events", [("page_token", encode_token("ed", 10**20))]),
         segment="", cookie="A", accept=None, inm=None, rng=None)
@example(request=("/dashboard/export", [("outcome", "exploded")]), segment="", cookie="A",
         accept=None, inm=None, rng=None)
@example(request=("/dashboard/static/{}", []), segment="x" * 5000, cookie="",
         accept=None, inm=None, rng=None)
@example(request=("/dashboard/spend", []), segment="", cookie="A", accept=None, inm=None,
         rng=b"\x00")
@example(request=("/dashboard/spend", [("customer", "x" * 10_000)]), segment="", cookie="A",
         accept=None, inm=None, rng=None)
@given(request=st.sampled_from(ROUTES + [*READS] * 2).flatmap(
    lambda r: st.tuples(st.just(r), _query_items(r))), segment=_segment(),
       cookie=st.sampled_from(COOKIES),
       accept=st.one_of(st.none(), st.sampled_from(HEADER_BYTES)),
       inm=st.one_of(st.none(), st.sampled_from(HEADER_BYTES)),
       rng=st.one_of(st.none(), st.sampled_from(HEADER_BYTES)))
def test_hostile_gets_are_below_500_name_the_parameter_and_leak_nothing(
        live, request, segment, cookie, accept, inm, rng):
    route, items = request
    d = live["d"]
    ids = {"TENANT_A": d.a.tenant_id, "TENANT_B": d.b.tenant_id}
    items = [(k, RawValue(v) if isinstance(v, RawValue) else ids.get(v, v))
             for k, v in items]
    path = route.format(segment)
    if items:
        path += "?" + "&".join(f"{enc(k)}={enc(v)}" for k, v in items)
    raw = (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Connection: close\r\n" + _header(b"Cookie", _cookie(cookie, live["sessions"]))
           + _header(b"Accept", accept) + _header(b"If-None-Match", inm)
           + _header(b"Range", rng) + _header(b"If-Modified-Since", rng) + b"\r\n")
    live["logs"].records.clear()
    status, headers, body = send(d.server.http_port, raw)
    sent = [str(v) for _, v in items] + [k for k, _ in items] + [
        segment, unquote(segment)]
    names = [k for k, _ in items] + [PATH_PARAMS.get(route, "")]
    event(f"{route} {'signed in' if cookie in live['sessions'] else cookie or 'none'}: {status}")
    check(live, path, sent, cookie, status, headers, body, names)


# --- POST sign-in and sign-out -----------------------------------------------------

CSRF = "csrf-of-this-request"  # sent as the sign-in cookie when the cookie matches


def _form_value(key_names: list[str]):
    return st.one_of(st.sampled_from(key_names), st.sampled_from(STRINGS),
                     st.sampled_from(NEXTS), st.text(max_size=12),
                     st.binary(max_size=8))


def _form(fields: list[tuple[str, object]], kind: str) -> tuple[bytes, bytes]:
    """(content type, body) of the fields in one encoding."""
    def b(v) -> bytes:
        return v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")
    if kind.startswith("multipart"):
        out = b""
        for i, (k, v) in enumerate(fields):
            fname = b'; filename="f.txt"' if kind == "multipart-files" and i % 2 == 0 else b""
            out += (b"--XB\r\nContent-Disposition: form-data; name=\"" + b(k) + b'"' + fname
                    + b"\r\n\r\n" + b(v) + b"\r\n")
        return b"multipart/form-data; boundary=XB", out + b"--XB--\r\n"
    if kind == "raw":  # bytes as they are, not percent-encoded
        return (b"application/x-www-form-urlencoded",
                b"&".join(b(k) + b"=" + b(v) for k, v in fields))
    body = "&".join(f"{enc(b(k))}={enc(b(v))}" for k, v in fields).encode()
    ctype = {"form": b"application/x-www-form-urlencoded",
             "form-latin1": b"application/x-www-form-urlencoded; charset=latin-1",
             "form-bogus": b"application/x-www-form-urlencoded; charset=p402-nope",
             "form-utf16": b"application/x-www-form-urlencoded; charset=utf-16",
             "text": b"text/plain", "none": b""}[kind]
    return ctype, body


FORM_KINDS = ["form", "form", "form", "raw", "form-latin1", "form-bogus", "form-utf16",
              "text", "none", "multipart", "multipart-files"]
KEYS = ["A-read", "A-admin", "A-meter", "B-read", "p402_nope", ""]


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None, database=None,
          derandomize=True, suppress_health_check=list(HealthCheck))
@example(target="signin", csrf="match", api_key="A-read", nxt=None, extra=[], kind="form",
         cookie="signin", origin=b"http://[::1")
@example(target="signin", csrf="match", api_key="A-read", nxt=None, extra=[],
         kind="multipart-files", cookie="signin", origin=None)
@example(target="signout", csrf="session", api_key=None, nxt=None, extra=[],
         kind="multipart-files", cookie="A", origin=None)
@example(target="signin", csrf="match", api_key="A-read", nxt=None, extra=[],
         kind="form-bogus", cookie="signin", origin=None)
@example(target="signin", csrf="match", api_key=b"\xff", nxt=None, extra=[], kind="raw",
         cookie="signin", origin=None)
@example(target="signin", csrf="match", api_key="A-read", nxt=None, extra=[("\x00", "x")],
         kind="multipart", cookie="signin", origin=None)
@example(target="signin", csrf="match", api_key="A-read", nxt=None, extra=[], kind="form",
         cookie="surrogate", origin=None)
@given(target=st.sampled_from(["signin", "signin", "signout"]),
       csrf=st.sampled_from(["match", "match", "missing", "", "wrong", "session", "\ud800",
                             b"\xff", "twice"]),
       api_key=st.one_of(st.sampled_from(KEYS), st.sampled_from(STRINGS), st.none(),
                         st.binary(max_size=4)),
       nxt=st.one_of(st.none(), st.sampled_from(NEXTS), st.sampled_from(STRINGS)),
       extra=st.lists(st.tuples(st.one_of(st.sampled_from(
           ["", "\x00", "csrf", "api_key", "next", "x" * 300, "\ud800"]), st.binary(max_size=4)),
           _form_value(["A-read"])), max_size=3),
       kind=st.sampled_from(FORM_KINDS),
       cookie=st.sampled_from(["", "signin", "signin", "A", "B", "fresh", "bytes", "garbage",
                               "surrogate"]),
       origin=st.sampled_from([None, None, b"http://127.0.0.1", b"null",
                               b"http://evil.example", b"\xff", b"http://[::1"]))
def test_hostile_sign_in_and_out_are_below_500_and_leak_nothing(
        live, target, csrf, api_key, nxt, extra, kind, cookie, origin):
    d, sessions = live["d"], live["sessions"]
    port = d.server.http_port
    keys = {"A-read": d.a.read_key, "A-admin": d.a.admin_key, "A-meter": d.a.meter_key,
            "B-read": d.b.read_key}
    fields: list[tuple[str, object]] = []
    cookies: list[bytes] = []
    session_csrf = CSRF
    if cookie == "fresh":  # a session of its own, as sign-out with its token ends it
        sid, session_csrf = _fresh_session(live)
        cookies.append(b"p402_session=" + sid.encode())
    elif cookie == "signin":
        cookies.append(b"p402_signin=" + CSRF.encode())
    elif cookie == "surrogate":  # bytes that are not UTF-8, as the token cookie
        cookies.append(b"p402_signin=\xed\xa0\x80" + CSRF.encode())
    elif cookie in ("A", "B"):
        cookies.append(b"p402_session=" + sessions[cookie][0].encode())
        session_csrf = "not-" + sessions[cookie][1]  # a shared session is never ended
    elif cookie:
        cookies.append(_cookie(cookie, sessions))
    if csrf != "missing":
        value = {"match": CSRF, "session": session_csrf, "wrong": "x" * 43,
                 "twice": CSRF}.get(csrf, csrf)
        fields.append(("csrf", value))
        if csrf == "twice":
            fields.append(("csrf", "other"))
    if api_key is not None:
        fields.append(("api_key", keys.get(api_key, api_key)))
    if nxt is not None:
        fields.append(("next", nxt))
    fields += [(k, keys.get(v, v) if isinstance(v, str) else v) for k, v in extra]
    ctype, body = _form(fields, kind)
    raw = (b"POST /dashboard/" + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:"
           + str(port).encode() + b"\r\nConnection: close\r\n"
           + _header(b"Content-Type", ctype or None)
           + _header(b"Cookie", b"; ".join(cookies) or None) + _header(b"Origin", origin)
           + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    live["logs"].records.clear()
    status, headers, resp = send(port, raw)
    sent = [v if isinstance(v, str) else v.decode("latin-1") for _, v in fields]
    who = {"fresh": "A", "A": "A", "B": "B"}.get(cookie, "")
    if status == 303 and "p402_session=" in headers.get("set-cookie", ""):
        who = ""  # signed in anew: the redirect says nothing of any tenant
    event(f"{target} {kind}: {status}")
    check(live, "/dashboard/" + target, sent, who, status, headers, resp,
          ["csrf", "api_key", "next", "form"])
    assert "\r" not in headers.get("location", "") and "\n" not in headers.get("location", "")


def _fresh_session(live) -> tuple[str, str]:
    d = live["d"]
    return asyncio.run_coroutine_threadsafe(
        _session_of(d.base, d.a.read_key), live["loop"]).result(30)


def test_shared_sessions_survive_the_fuzzing(live):
    """The signed-in examples ran signed in: no example ended a shared session."""
    d = live["d"]
    for who, (sid, _) in live["sessions"].items():
        raw = (b"GET /dashboard/statements HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Connection: close\r\nCookie: p402_session=" + sid.encode() + b"\r\n\r\n")
        status, _, body = send(d.server.http_port, raw)
        assert status == 200, (who, status)
        assert re.search(rb'name="csrf"', body)

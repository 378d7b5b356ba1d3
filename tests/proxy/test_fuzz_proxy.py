"""Hostile HTTP to `p402 proxy` (hypothesis): generated bodies (JSON with odd types
and strings, lone surrogate escapes, deep nesting, raw bytes) and generated header
values (control characters, non-UTF-8 bytes, huge values) on /v1/chat/completions;
generated media requests (images as JSON, transcriptions and image edits as
multipart, speech) with odd field values (digits that are not ASCII, 2^63, NUL,
odd types) and an odd `x-p402-audio-ms`.

Oracle: every request gets an answer below 500; every error answer is OpenAI-style
JSON ({"error": {"message", "type", "code", "param"}}); nothing the proxy logs holds a
traceback or the caller's key; and the ledger grows by exactly the calls the proxy
answered 200 (each recorded once).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import start_rig
from tests.support.hostile import ODD, json_value, odd_text
from tests.support.live_loop import on_a_loop

EXAMPLES = int(os.environ.get("P402_PROXY_FUZZ_EXAMPLES", "400"))
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxyfuzz")
    with on_a_loop(lambda: start_rig(tmp)) as (loop, rig, logs):
        yield {"rig": rig, "loop": loop, "logs": logs, "ok": 0}


def _chat_body():
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
        optional={"content": st.one_of(odd_text(), json_value(1))}), max_size=3)
    return st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.sampled_from(["gpt-4o-mini"] * 3 + ODD), json_value(2)),
        "messages": st.one_of(messages, json_value(1)),
        "max_tokens": st.one_of(st.integers(-5, 2**63), st.sampled_from([None, "9", 1.5])),
        "stream": st.one_of(st.booleans(), json_value(2)),
        "stream_options": json_value(1),
    }).map(lambda d: json.dumps(d).encode())


VALID = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}]}).encode()
BODIES = st.one_of(
    st.just(VALID),
    _chat_body(), _chat_body(),
    st.binary(max_size=200),
    st.sampled_from([b'{"model": "gpt-4o-mini", "messages": [{"role": "user", '
                     b'"content": "\\ud800"}]}',
                     b'{"model": "\\udfff"}', b"[" * 5000 + b"]" * 5000, b"{", b"null",
                     b'"text"', b"1e999999"]),
)
HEADER_VALUE = st.one_of(st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n"
                                                                   not in b),
                         st.sampled_from([b"\x00", b"\x01abc", b"\xff\xfe", b"x" * 9000,
                                          "é".encode("latin-1"), b"acme"]))


ODD_COUNTS = ["2", " 3 ", "²", "٣", "１", "0", "-1", "1.5", "11", str(2**63), "", "\x00",
              "9" * 40]


def _field():
    return st.one_of(st.sampled_from(ODD_COUNTS + ODD), st.text(max_size=12))


def _media_json():
    """(endpoint, JSON body) for images/generations and audio/speech."""
    value = st.one_of(_field(), json_value(1))
    images = st.fixed_dictionaries({"model": st.sampled_from(["gpt-image-1", "dall-e-3"])},
                                   optional={"prompt": value, "n": value,
                                             "size": st.one_of(st.sampled_from(
                                                 ["1024x1024", "1792x1024", "x"]), value),
                                             "quality": st.one_of(st.sampled_from(
                                                 ["low", "hd", "standard"]), value)})
    speech = st.fixed_dictionaries({"model": st.sampled_from(["tts-1", "tts-1-hd"]),
                                    "voice": st.just("alloy")}, optional={"input": value})
    return st.one_of(images.map(lambda b: ("images/generations", b)),
                     speech.map(lambda b: ("audio/speech", b))).map(
        lambda eb: (eb[0], json.dumps(eb[1]).encode("utf-8", "surrogatepass")))


def _multipart(fields: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (b"--XB\r\nContent-Disposition: " + disp.encode() + b"\r\n\r\n" + value
                + b"\r\n")
    return out + b"--XB--\r\n"


def _media_form():
    """(endpoint, multipart body) for audio/transcriptions and images/edits."""
    text = _field().map(lambda t: t.encode("utf-8", "surrogatepass"))
    transcription = st.tuples(
        st.sampled_from([b"whisper-1", b"gpt-4o-transcribe", b"\x00", b"\xff"]),
        st.binary(max_size=3000), st.booleans(),
    ).map(lambda t: ("audio/transcriptions", _multipart(
        [("model", t[0], None)] + ([("file", t[1], "a.mp3")] if t[2] else []))))
    edit = st.tuples(text, text, st.binary(max_size=500)).map(
        lambda t: ("images/edits", _multipart([("model", b"gpt-image-1", None),
                                               ("n", t[0], None), ("prompt", t[1], None),
                                               ("size", b"1024x1024", None),
                                               ("image", t[2], "a.png")])))
    return st.one_of(transcription, edit, st.tuples(
        st.sampled_from(["audio/transcriptions", "images/edits"]),
        st.binary(max_size=300)))


def _check_answer(live, status: int, payload: bytes) -> None:
    """The oracle: below 500; an error is OpenAI-style JSON; no log line so far holds
    a traceback or the caller's key. A 200 is counted for the ledger's check."""
    assert status < 500, (status, payload[:300])
    if status == 200:
        live["ok"] += 1
    else:
        err = json.loads(payload)["error"]
        assert set(err) >= {"message", "type", "code", "param"}, err
    for r in live["logs"].records:
        text = r.getMessage() + (r.exc_text or "")
        assert live["rig"].meter_key not in text, text[:300]
        assert r.exc_info is None, (r.name, r.getMessage()[:300])


def send(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head_part, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":", 1)[1]) for line in head_part.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    head_part, _, rest = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), rest


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(body=VALID, customer=b"acme", feature=b"chat", key_suffix=b"")
@example(body=VALID, customer=b"acme", feature=b"", key_suffix=b"")
@given(body=BODIES, customer=HEADER_VALUE, feature=HEADER_VALUE,
       key_suffix=st.sampled_from([b"", b"", b"\x01", b" ", b"\x00x"]))
def test_hostile_http_gets_json_below_500_and_clean_logs(live, body, customer, feature,
                                                         key_suffix):
    rig = live["rig"]
    head = (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + rig.meter_key.encode() + key_suffix + b"\r\n"
            b"x-p402-customer: " + customer + b"\r\nx-p402-feature: " + feature + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    _check_answer(live, *send(rig.proxy_port, head, body))


@settings(max_examples=EXAMPLES // 2, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(request=("images/generations", json.dumps(
    {"model": "gpt-image-1", "prompt": "x", "n": "²", "size": "1024x1024",
     "quality": "low"}).encode()), audio_ms=b"")
@example(request=("images/edits", _multipart(
    [("model", b"gpt-image-1", None), ("n", "²".encode(), None),
     ("size", b"1024x1024", None), ("image", b"png", "a.png")])), audio_ms=b"")
@example(request=("audio/transcriptions", _multipart(
    [("model", b"whisper-1", None), ("file", b"ID3", "a.mp3")])), audio_ms="²".encode())
@given(request=st.one_of(_media_json().map(lambda r: (*r, "application/json")),
                         _media_form().map(lambda r: (*r, "multipart/form-data; "
                                                          "boundary=XB"))),
       audio_ms=st.one_of(st.just(b""), st.sampled_from(ODD_COUNTS).map(
           lambda t: t.encode()), st.binary(max_size=12).filter(
           lambda b: b"\r" not in b and b"\n" not in b)))
def test_hostile_media_requests_get_json_below_500_and_clean_logs(live, request,
                                                                  audio_ms):
    rig = live["rig"]
    endpoint, body, *ctype = request
    ctype = ctype[0] if ctype else (
        "application/json" if endpoint in ("images/generations", "audio/speech")
        else "multipart/form-data; boundary=XB")
    head = (b"POST /v1/" + endpoint.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\nContent-Type: " + ctype.encode() + b"\r\n"
            b"Authorization: Bearer " + rig.meter_key.encode() + b"\r\n"
            b"x-p402-customer: acme\r\n"
            + (b"x-p402-audio-ms: " + audio_ms + b"\r\n" if audio_ms else b"")
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    _check_answer(live, *send(rig.proxy_port, head, body))


def test_the_ledger_holds_every_answered_call_once(live):
    rig = live["rig"]

    async def count():
        await asyncio.sleep(0.5)  # Records commit behind the answers
        page = await rig.admin.query(group_by=["outcome"])
        return sum(r.event_count for r in page.items if r.group["outcome"] != "DENIED")

    assert live["ok"] > 0
    n = asyncio.run_coroutine_threadsafe(count(), live["loop"]).result(30)
    assert n == live["ok"]

"""A hostile or broken upstream behind `p402 proxy` (hypothesis): generated answers
(JSON with usage of odd types and sizes, 2^63 and 2^70, negative, strings, floats,
NUL, lone surrogates; not JSON, not an object; error statuses), generated SSE
streams (tests/support/sse_streams: spaced or escaped JSON, duplicated usage keys,
invalid UTF-8, "\\r", comments, events cut short, usage chunks with odd values), and
generated media answers (images with odd `data` and usage; transcriptions with odd
durations: infinite, 1e300, negative, strings; odd token usage).

Oracle: the caller always gets an answer (the upstream's, relayed, or the proxy's
OpenAI-style JSON error), never a dropped connection; nothing the proxy logs holds a
traceback; every call the upstream answered is committed to the ledger once, with
the upstream's usage, or the estimate when the usage is missing or unreadable (no
Record is refused and left to its hold's expiry).
"""
from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.live_loop import on_a_loop
from tests.support.sse_streams import sse_stream

EXAMPLES = int(os.environ.get("P402_UPSTREAM_FUZZ_EXAMPLES", "150"))
ODD_NUMBERS = [0, 1, 9, -1, -(2**63), 2**63 - 1, 2**63, 2**64, 2**70, True, None, 1.5,
               9.0, 1e300, "9", "", "\x00", "\ud800", [], {}, [9], {"n": 9}]


class Scripted:
    """The upstream: answers the next call with what the test set."""

    def __init__(self):
        self.status, self.content_type, self.pieces = 200, "application/json", [b"{}"]
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.calls += 1
        resp = web.StreamResponse(status=self.status,
                                  headers={"Content-Type": self.content_type})
        await resp.prepare(request)
        for piece in self.pieces:
            await resp.write(piece)
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from p402_client import AsyncP402Client
    from p402_server.gateways.proxy import ProxyConfig, start_proxy
    from p402_server.ledger import open_store
    from p402_server.server import create_server, init_tenant

    tmp = tmp_path_factory.mktemp("upstreamfuzz")
    upstream = Scripted()

    async def start():
        store = await open_store(f"sqlite+aiosqlite:///{tmp}/ledger.db")
        server, port = create_server("127.0.0.1:0", store=store)
        await server.start()
        _tenant, admin_key = await init_tenant(store, "upstream-fuzz")
        admin = AsyncP402Client(f"127.0.0.1:{port}", api_key=admin_key, timeout=10.0)
        meter = await admin.create_key("proxy-caller", ["meter"])
        app = web.Application()
        app.router.add_post("/v1/{endpoint:.+}", upstream.handle)
        up_runner = web.AppRunner(app, access_log=None)
        await up_runner.setup()
        site = web.TCPSite(up_runner, "127.0.0.1", 0)
        await site.start()
        up_port = site._server.sockets[0].getsockname()[1]
        config = ProxyConfig(upstream=f"http://127.0.0.1:{up_port}/v1", upstream_key="sk-up",
                             upstream_timeout=10.0)
        runner, proxy_port = await start_proxy(config, f"127.0.0.1:{port}", "127.0.0.1:0")
        session = aiohttp.ClientSession()

        async def stop():
            await session.close()
            await runner.cleanup()
            await up_runner.cleanup()
            await admin.close()
            await server.stop(1.0)
            await store.close()

        return {"admin": admin, "key": meter.api_key, "port": proxy_port,
                "session": session}, stop

    with on_a_loop(start) as (loop, rig, logs):
        yield {**rig, "loop": loop, "logs": logs, "upstream": upstream, "answered": 0}


def _odd_usage():
    number = st.one_of(st.sampled_from(ODD_NUMBERS), st.integers(-(2**70), 2**70))
    return st.one_of(
        st.none(), st.sampled_from([[], "9", 0, {}]),
        st.fixed_dictionaries({}, optional={
            "prompt_tokens": number, "completion_tokens": number, "total_tokens": number,
            "prompt_tokens_details": st.one_of(
                number, st.fixed_dictionaries({}, optional={"cached_tokens": number,
                                                             "audio_tokens": number})),
            "completion_tokens_details": st.one_of(
                number, st.fixed_dictionaries({}, optional={"reasoning_tokens": number}))}))


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def whole_answer(draw):
    status = draw(st.sampled_from([200] * 6 + [400, 429, 500, 503]))
    body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": draw(st.text(max_size=5))}}]}
    if draw(st.booleans()):
        body["usage"] = draw(_odd_usage())
    if draw(st.booleans()):
        body["service_tier"] = draw(st.sampled_from(ODD_NUMBERS + ["flex", "default"]))
    raw = draw(st.one_of(st.just(_dumps(body)), st.just(_dumps(body)),
                         st.sampled_from([b"", b"null", b"[1]", b"{", b"\xff", b'"x"',
                                          b'{"usage": {"prompt_tokens": 1e999}}'])))
    return status, "application/json", [raw]


@st.composite
def streamed_answer(draw):
    raw, ends = draw(sse_stream())
    usage = draw(_odd_usage())
    if draw(st.booleans()):
        raw += b'data: ' + _dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n"
        ends = ends + [len(raw)]
    pieces, at = [], 0
    for end in ends:
        pieces.append(raw[at:end])
        at = end
    return 200, "text/event-stream", [p for p in pieces if p]


ODD_VALUES = ODD_NUMBERS + [float("inf"), float("-inf"), float("nan"), -0.5, 1e-300,
                           10**5, 1e5 + 0.5, 99_999.999]


@st.composite
def media_answer(draw):
    """(endpoint, status, content type, pieces): an images or transcription answer."""
    status = draw(st.sampled_from([200] * 6 + [400, 500]))
    value = st.one_of(st.sampled_from(ODD_VALUES), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=True, allow_infinity=True))
    if draw(st.booleans()):
        body = {"created": 1}
        if draw(st.booleans()):
            body["data"] = draw(st.one_of(st.sampled_from([[], [{}], "x", None, 3]),
                                          st.lists(st.just({"b64_json": "AA=="}),
                                                   max_size=12)))
        if draw(st.booleans()):
            body["usage"] = draw(st.one_of(_odd_usage(), st.fixed_dictionaries(
                {}, optional={"input_tokens": value, "output_tokens": value,
                              "total_tokens": value})))
        return "images/generations", status, "application/json", [_dumps(body)]
    body = {"text": "hello"}
    shape = draw(st.sampled_from(["duration", "usage_duration", "usage_tokens", "none"]))
    if shape == "duration":
        body["duration"] = draw(value)
    elif shape == "usage_duration":
        body["usage"] = {"type": "duration", "seconds": draw(value)}
    elif shape == "usage_tokens":
        body["usage"] = {"type": "tokens", "input_tokens": draw(value),
                         "output_tokens": draw(value),
                         "input_token_details": draw(st.one_of(
                             st.sampled_from([None, 3, "x", []]),
                             st.fixed_dictionaries({"audio_tokens": value})))}
    return "audio/transcriptions", status, "application/json", [_dumps(body)]


async def _call(live, endpoint: str, stream: bool = False) -> tuple[int, bytes]:
    kw: dict = {}
    if endpoint == "images/generations":
        kw["json"] = {"model": "gpt-image-1", "prompt": "a fox", "n": 2,
                      "size": "1024x1024", "quality": "low"}
    elif endpoint == "audio/transcriptions":
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("file", b"ID3" + bytes(3000), filename="a.mp3")
        kw["data"] = form
    else:
        kw["json"] = {"model": "gpt-4o-mini", "max_tokens": 5, "stream": stream,
                      "messages": [{"role": "user", "content": "hi"}]}
    async with live["session"].post(
            f"http://127.0.0.1:{live['port']}/v1/{endpoint}", **kw,
            headers={"Authorization": f"Bearer {live['key']}",
                     "x-p402-customer": "acme"}) as r:
        return r.status, await r.read()


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(answer=("chat/completions", 200, "application/json",
                  [b'{"choices": [], "usage": {"prompt_tokens": 1}, "service_tier": []}']))
@example(answer=("audio/transcriptions", 200, "application/json",
                  [b'{"text": "hi", "duration": Infinity}']))
@example(answer=("audio/transcriptions", 200, "application/json",
                  [b'{"text": "hi", "usage": {"type": "duration", "seconds": 1e300}}']))
@example(answer=("audio/transcriptions", 200, "application/json",
                  [b'{"text": "hi", "duration": "61.5"}']))
@given(answer=st.one_of(
    whole_answer().map(lambda a: ("chat/completions", *a)),
    streamed_answer().map(lambda a: ("chat/completions", *a)),
    media_answer()))
def test_any_upstream_answer_is_relayed_and_accounted_for(live, answer):
    endpoint, status, content_type, pieces = answer
    up = live["upstream"]
    up.status, up.content_type, up.pieces = status, content_type, pieces
    before = up.calls
    got, payload = asyncio.run_coroutine_threadsafe(
        _call(live, endpoint, content_type == "text/event-stream"), live["loop"]).result(30)
    assert up.calls == before + 1, (got, payload[:300])
    live["answered"] += 1
    assert got == status, (got, payload[:300])
    if content_type == "text/event-stream":
        assert payload.endswith(b"\n\n") or not payload, payload[-100:]
    for r in live["logs"].records:
        assert r.exc_info is None, (r.name, r.getMessage()[:300])


def test_every_answered_call_is_in_the_ledger_once(live):
    async def count():
        await asyncio.sleep(0.5)  # Records commit behind the answers
        page = await live["admin"].query(group_by=["outcome"])
        return sum(r.event_count for r in page.items if r.group["outcome"] != "DENIED")

    assert live["answered"] > 0
    committed = asyncio.run_coroutine_threadsafe(count(), live["loop"]).result(30)
    # An unreadable usage is not read (the estimate stands in), so no Record is
    # refused when its batch is built: every call is committed now, none left to
    # its hold's expiry.
    refused = [r.getMessage() for r in live["logs"].records if "refused" in r.getMessage()]
    assert not refused, refused[:3]
    assert committed == live["answered"]

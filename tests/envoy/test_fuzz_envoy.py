"""Hostile input to the Envoy gateways (hypothesis), as a broken or hostile caller and
upstream can make Envoy send it.

ext_proc (ExternalProcessor/Process): generated exchanges in the message order Envoy's
protocol follows: request headers with odd values (NUL, control characters, raw bytes
that are not UTF-8, 2^63 or digits that are not ASCII in x-p402-attempt and
content-length, huge values, odd owners and labels, a missing or odd :path, :method or
content-type); a request body (JSON with odd types for model, max_tokens, stream,
stream_options and messages, lone surrogate escapes, deep nesting, raw bytes, nothing)
sent whole or in pieces; response headers with odd :status values; a response body
(buffered JSON with odd usage: strings, floats, negative, 2^63, 2^70, Infinity, lists,
dicts, an odd service_tier; or SSE cut anywhere, tests/support/sse_streams); trailers
or not; the stream cancelled part way or not.

ext_authz (Authorization/Check): generated CheckRequests with the same odd headers,
paths and bodies, and odd route context extensions.

Oracle: a Process stream answers every message Envoy sends with the ProcessingResponse
of that phase, or an immediate_response (an OpenAI-style JSON error body), and never
ends with a gRPC error (the messages follow the protocol, so none is due); a Check is
answered OK or denied with a 4xx/503 and the same JSON body, never a gRPC error;
nothing logged holds a traceback or the caller's key; every exchange that was
authorized (its request answered CONTINUE with x-p402-reservation-id) is in the
ledger exactly once (recorded, never refused and left to its hold's expiry); and an
answer's usage is recorded as `p402 proxy` reads the same answer (REPORTED with its
tokens, or ESTIMATED when it has none that can be read).
"""
from __future__ import annotations

import asyncio
import json
import os

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2",
                    reason="xds-protos is not installed (extra `envoy`)")

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.auth.v3 import attribute_context_pb2 as ac  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2 as ea  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: E402
from google.rpc import code_pb2  # noqa: E402

from tests.support.hostile import ODD, json_value, odd_text  # noqa: E402
from tests.support.live_loop import on_a_loop  # noqa: E402
from tests.support.sse_streams import sse_stream  # noqa: E402

EXAMPLES = int(os.environ.get("P402_ENVOY_FUZZ_EXAMPLES", "150"))
ODD_COUNTS = ["2", " 3 ", "²", "٣", "１", "0", "-1", "1.5", "11", str(2**31), str(2**63),
              str(2**64), "", "\x00", "9" * 40]
ODD_NUMBERS = [0, 1, 9, -1, -(2**63), 2**63 - 1, 2**63, 2**64, 2**70, True, None, 1.5,
               9.0, 1e300, float("inf"), float("-inf"), float("nan"), "9", "", "\x00",
               "\ud800", [], {}, [9], {"n": 9}]
PATHS = ["/v1/chat/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
         "/v1/chat/completions?x=/v1/responses", "/", "", "\x00", "/v1/chat/completions\x7f",
         "/v1/models", "x" * 3000]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from p402_client import AsyncP402Client
    from p402_server.ledger import open_store
    from p402_server.server import create_server, init_tenant

    tmp = tmp_path_factory.mktemp("envoyfuzz")

    async def start():
        store = await open_store(f"sqlite+aiosqlite:///{tmp}/ledger.db")
        server, port = create_server("127.0.0.1:0", store=store, ext_authz=True)
        await server.start()
        _tenant, admin_key = await init_tenant(store, "envoy-fuzz")
        admin = AsyncP402Client(f"127.0.0.1:{port}", api_key=admin_key, timeout=10.0)
        meter = await admin.create_key("envoy", ["meter"])
        # one customer always refused (402), one under a HARD budget (caps clamped)
        await admin.put_budget("poor", limit_nanos=1, period="TOTAL", enforcement="HARD",
                               scope={"customer": "poor"})
        await admin.put_budget("capped", limit_nanos=10**12, period="TOTAL",
                               enforcement="HARD", scope={"customer": "capped"})
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        async def stop():
            await channel.close()
            await admin.close()
            await server.stop(1.0)
            await store.close()

        return {"admin": admin, "key": meter.api_key,
                "process": pb_grpc.ExternalProcessorStub(channel),
                "check": ea_grpc.AuthorizationStub(channel)}, stop

    with on_a_loop(start) as (loop, rig, logs):
        yield {**rig, "loop": loop, "logs": logs, "authorized": [], "expected": {}}


# --- generated input -------------------------------------------------------------


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def _request_body():
    messages = st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
        optional={"content": st.one_of(odd_text(), json_value(1))}), max_size=3)
    cap = st.one_of(st.integers(-5, 2**70), st.sampled_from([None, "9", 1.5, True, 0, 10**6]))
    return st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.sampled_from(["gpt-4o-mini"] * 4 + ["o3-mini", "gpt-4o"] + ODD),
                           json_value(2)),
        "messages": st.one_of(messages, json_value(1)),
        "input": st.one_of(odd_text(), json_value(1)),
        "max_tokens": cap, "max_completion_tokens": cap, "max_output_tokens": cap,
        "stream": st.one_of(st.booleans(), json_value(2)),
        "stream_options": json_value(1),
    }).map(_dumps)


DEEP = b'{"model": "gpt-4o-mini", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
VALID = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}]}).encode()
BODIES = st.one_of(
    st.just(VALID), st.just(VALID),
    _request_body(), _request_body(), _request_body(),
    st.binary(max_size=200),
    st.sampled_from([b"", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", '
                     b'"content": "\\ud800"}]}',
                     b'{"model": "\\udfff"}', DEEP, b"[" * 5000 + b"]" * 5000, b"{",
                     b"null", b'"text"', b"1e999999", b'{"model": "gpt-4o-mini", '
                     b'"max_tokens": 1' + b"0" * 5000 + b"}"]),
)
HEADER_VALUE = st.one_of(st.binary(max_size=40),
                         st.sampled_from([b"\x00", b"\x01abc", b"\xff\xfe", b"x" * 9000,
                                          "é".encode("latin-1"), b"acme", b"acme", b"poor",
                                          b"capped", b"capped"]))
COUNT = st.one_of(st.sampled_from(ODD_COUNTS), st.text(max_size=8)).map(
    lambda t: t.encode("utf-8", "surrogatepass"))


@st.composite
def request_headers(draw) -> dict[str, bytes]:
    """An HTTP request's headers as Envoy passes them (a missing one: absent)."""
    h: dict[str, bytes] = {}
    for name, values in ((":method", ["POST"] * 4 + ["GET", "", "\x00", "PO ST"]),
                         (":path", PATHS),
                         ("content-type", ["application/json"] * 4 + [
                             "text/plain", "", "application/json; charset=latin-1",
                             "multipart/form-data", "\x00json"])):
        if draw(st.integers(0, 9)):
            h[name] = draw(st.one_of(st.sampled_from(values), odd_text())).encode(
                "utf-8", "surrogatepass")
    return h


@st.composite
def key_headers(draw) -> dict[str, bytes]:
    """The caller's key: KEY stands for the rig's meter key (`_with_key`)."""
    key = "KEY"
    how = draw(st.sampled_from(["bearer"] * 6 + ["x-p402-key", "none", "odd", "other"]))
    if how == "bearer":
        return {"authorization": b"Bearer " + key.encode()}
    if how == "x-p402-key":
        return {"x-p402-key": key.encode()}
    if how == "odd":
        return {"authorization": draw(st.sampled_from(
            [b"Bearer ", b"bearer " + key.encode() + b"\x00", b"Bearer p402_\xff\xfe",
             b"Bearer " + key.encode() + b" x", b"Basic " + key.encode(),
             b"Bearer p402_" + b"x" * 9000, b"Bearer sk-other"]))}
    if how == "other":
        return {"authorization": b"Bearer sk-up", "x-p402-key": draw(HEADER_VALUE)}
    return {}


@st.composite
def p402_headers(draw) -> dict[str, bytes]:
    """Owners, labels, retries and model as a caller may set them."""
    h: dict[str, bytes] = {}
    if draw(st.integers(0, 3)):
        h["x-p402-customer"] = draw(HEADER_VALUE)
    for name in ("x-p402-feature", "x-p402-employee", "x-p402-label-team",
                 "x-p402-label-", "x-p402-label-\x00", "x-p402-retry-of", "x-p402-model"):
        if not draw(st.integers(0, 4)):
            h[name] = draw(HEADER_VALUE)
    for name in ("x-p402-attempt", "content-length"):
        if not draw(st.integers(0, 3)):
            h[name] = draw(COUNT)
    return h


def _usage():
    number = st.one_of(st.sampled_from(ODD_NUMBERS), st.integers(-(2**70), 2**70))
    tokens = st.integers(0, 10**6)
    return st.one_of(
        st.none(), st.sampled_from([[], "9", 0, {}]),
        st.fixed_dictionaries({"prompt_tokens": tokens, "completion_tokens": tokens}),
        st.fixed_dictionaries({"input_tokens": tokens, "output_tokens": tokens}),
        st.fixed_dictionaries({}, optional={
            "prompt_tokens": number, "completion_tokens": number, "total_tokens": number,
            "input_tokens": number, "output_tokens": number,
            "prompt_tokens_details": st.one_of(
                number, st.fixed_dictionaries({}, optional={"cached_tokens": number,
                                                             "audio_tokens": number})),
            "completion_tokens_details": st.one_of(
                number, st.fixed_dictionaries({}, optional={"reasoning_tokens": number}))}))


@st.composite
def buffered_answer(draw) -> bytes:
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
    if draw(st.integers(0, 3)):
        body["usage"] = draw(_usage())
    if draw(st.booleans()):
        body["service_tier"] = draw(st.sampled_from(ODD_NUMBERS + ["flex", "default"]))
    if draw(st.booleans()):
        body["output"] = draw(st.sampled_from([[{"type": "web_search_call"}], "x", [1]]))
    return draw(st.one_of(st.just(_dumps(body)), st.just(_dumps(body)), st.sampled_from(
        [b"", b"null", b"[1]", b"{", b"\xff", b'"x"', b'{"usage": {"prompt_tokens": 1e999}}',
         b'{"usage": {"prompt_tokens": Infinity}}', b'{"usage": ' + b"[" * 5000 + b"]" * 5000
         + b"}", b"[" * 5000 + b"]" * 5000, b'{"usage": {"prompt_tokens": 1' + b"0" * 5000
         + b"}}"])))


@st.composite
def streamed_answer(draw) -> list[bytes]:
    raw, ends = draw(sse_stream())
    if draw(st.booleans()):
        raw += (b"data: " + _dumps({"choices": [], "usage": draw(_usage()),
                                    "service_tier": draw(st.sampled_from(ODD_NUMBERS))})
                + b"\n\ndata: [DONE]\n\n")
        ends = ends + [len(raw)]
    pieces, at = [], 0
    for end in ends:
        pieces.append(raw[at:end])
        at = end
    return [p for p in pieces if p]


STATUS = st.one_of(st.sampled_from(["200"] * 24 + ["400", "429", "500", "503", "", "abc", "²",
                                                  "٣", "-1", "2" * 30, str(2**63), "20\x00",
                                                  " 200", "1e3"]),
                   st.text(max_size=4).filter(lambda t: t != "200"))


@st.composite
def allowed_request(draw) -> tuple[dict[str, bytes], bytes]:
    """A request let through (half of them, so the answer's side is exercised): a
    valid key, owners and model; odd stream, stream_options and caps."""
    path = draw(st.sampled_from(["/v1/chat/completions"] * 3 + ["/v1/responses",
                                                                "/v1/embeddings"]))
    headers = {":method": b"POST", ":path": path.encode(),
               "content-type": b"application/json", "authorization": b"Bearer KEY",
               "x-p402-customer": draw(st.sampled_from([b"acme", b"capped", b"capped"]))}
    cap = st.one_of(st.none(), st.integers(1, 10**6), st.sampled_from([5, 10**8, 2**62]))
    body = draw(st.fixed_dictionaries(
        {"model": st.sampled_from(["gpt-4o-mini", "gpt-4o-mini", "o3-mini", "gpt-4o"]),
         "messages": st.just([{"role": "user", "content": "hi"}]),
         "input": st.just("hi")},
        optional={"max_tokens": cap, "max_completion_tokens": cap,
                  "max_output_tokens": cap,
                  "stream": st.one_of(st.booleans(), json_value(2)),
                  "stream_options": json_value(1)}))
    if path == "/v1/embeddings":
        body["model"] = "text-embedding-3-small"
    return headers, _dumps(body)


@st.composite
def any_request(draw) -> tuple[dict[str, bytes], bytes]:
    """A hostile request: odd headers and body of every kind."""
    return ({**draw(request_headers()), **draw(key_headers()), **draw(p402_headers())},
            draw(BODIES))


REQUESTS = st.one_of(allowed_request(), any_request())


@st.composite
def exchange(draw) -> dict:
    """One HTTP exchange as Envoy's messages (KEY stands for the rig's meter key), and
    after how many answers the stream is cancelled (None: it runs to the end)."""
    headers, body = draw(REQUESTS)
    no_body = not draw(st.integers(0, 9))
    msgs: list[pb.ProcessingRequest] = [pb.ProcessingRequest(request_headers=_hdrs(
        headers, draw, end=no_body))]
    if not no_body:
        cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=3))))
        at = 0
        for cut in cuts + [len(body)]:
            msgs.append(pb.ProcessingRequest(request_body=pb.HttpBody(body=body[at:cut])))
            at = cut
        msgs[-1].request_body.end_of_stream = True
    sse = draw(st.booleans())
    status = draw(STATUS)
    rh = {":status": status.encode("utf-8", "surrogatepass")}
    ctype = draw(st.sampled_from(["text/event-stream" if sse else "application/json"] * 5 + [
                                  "application/json", "text/event-stream; charset=utf-8",
                                  ""]))
    if ctype:
        rh["content-type"] = ctype.encode()
    if not draw(st.integers(0, 9)):
        del rh[":status"]
    no_answer_body = not draw(st.integers(0, 9))
    msgs.append(pb.ProcessingRequest(response_headers=_hdrs(rh, draw, end=no_answer_body)))
    pieces = []
    if not no_answer_body:
        pieces = draw(streamed_answer()) if sse else [draw(buffered_answer())]
        if not sse and draw(st.booleans()) and len(pieces[0]) > 1:  # STREAMED mode on JSON
            cut = draw(st.integers(1, len(pieces[0]) - 1))
            pieces = [pieces[0][:cut], pieces[0][cut:]]
        trailers = draw(st.booleans())
        for i, piece in enumerate(pieces):
            msgs.append(pb.ProcessingRequest(response_body=pb.HttpBody(
                body=piece, end_of_stream=i == len(pieces) - 1 and not trailers)))
        if not pieces:
            msgs.append(pb.ProcessingRequest(response_body=pb.HttpBody(
                end_of_stream=not trailers)))
        if trailers:
            msgs.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    stop = None
    if not draw(st.integers(0, 3)):  # the client went away, Envoy reset the stream
        stop = draw(st.integers(1, len(msgs)))
    return {"messages": msgs, "stop_after": stop, "path": headers.get(":path"),
            "status": rh.get(":status"), "content_type": rh.get("content-type"),
            "answer": pieces}


def _hdrs(d: dict[str, bytes], draw=None, end: bool = False) -> pb.HttpHeaders:
    """Headers as Envoy sends them: raw_value bytes (its current field), or the
    deprecated string `value` when the bytes are UTF-8 and the draw says so."""
    out = []
    for k, v in d.items():
        as_value = draw is not None and draw(st.integers(0, 3)) == 0
        try:
            text = v.decode("utf-8")
        except UnicodeDecodeError:
            as_value = False
        if as_value and text:
            out.append(base_pb2.HeaderValue(key=k, value=text))
        else:
            out.append(base_pb2.HeaderValue(key=k, raw_value=v))
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=out), end_of_stream=end)


# --- driving a Process stream ----------------------------------------------------


async def run(live, messages, stop_after):
    """One Process stream as Envoy drives it: each message after the previous answer.
    -> (the answers, the gRPC error code the stream ended with, or None)."""
    call = live["process"].Process(timeout=30)
    answers: list[pb.ProcessingResponse] = []
    try:
        for m in messages:
            await call.write(m)
            answer = await call.read()
            if answer is grpc.aio.EOF:
                return answers, "EOF"
            answers.append(answer)
            if stop_after is not None and len(answers) >= stop_after:
                call.cancel()
                return answers, None
            if answer.HasField("immediate_response"):
                break
        await call.done_writing()
        rest = await call.read()
        return answers, None if rest is grpc.aio.EOF else f"extra answer {rest}"
    except grpc.aio.AioRpcError as err:
        return answers, (err.code(), err.details())


PHASE = {"request_headers": "request_headers", "request_body": "request_body",
         "request_trailers": "request_trailers", "response_headers": "response_headers",
         "response_body": "response_body", "response_trailers": "response_trailers"}


def _error_body(raw: bytes) -> dict:
    err = json.loads(raw)["error"]
    assert set(err) >= {"message", "type", "code", "param"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def _set_headers(common) -> dict[str, str]:
    return {h.header.key: (h.header.raw_value or h.header.value.encode()).decode()
            for h in common.header_mutation.set_headers}


def check_answers(live, messages, answers) -> None:
    """Each answer is the phase's own (or an immediate response); an authorized
    exchange is noted for the ledger check."""
    for m, a in zip(messages, answers):
        sent, got = m.WhichOneof("request"), a.WhichOneof("response")
        if got == "immediate_response":
            imm = a.immediate_response
            assert sent in ("request_headers", "request_body"), (sent, imm)
            assert 400 <= imm.status.code < 600, imm
            assert imm.status.code != 500, imm
            _error_body(imm.body)
            continue
        assert got == PHASE[sent], (sent, got)
        common = getattr(a, got).response if got != "response_trailers" else None
        if common is None:
            continue
        added = _set_headers(common)
        if "x-p402-reservation-id" in added:
            assert added["x-p402-decision"] in ("ALLOW", "WARN"), added
            live["authorized"].append(added["x-p402-reservation-id"])
        if common.HasField("body_mutation"):
            new = common.body_mutation.body
            json.loads(new)
            assert added["content-length"] == str(len(new)), added


def check_logs(live, start: int = 0) -> None:
    """The log records from `start` on: no traceback, no key, no error of P402's."""
    for r in live["logs"].records[start:]:
        text = r.getMessage() + (r.exc_text or "")
        assert live["key"] not in text, text[:300]
        assert r.exc_info is None, (r.name, r.getMessage()[:300])
        assert r.levelname != "ERROR" or not r.name.startswith("p402"), r.getMessage()[:300]


KINDS = {b"/v1/chat/completions": "chat", b"/v1/responses": "responses",
         b"/v1/embeddings": "embeddings"}


def expected_usage(ex: dict):
    """The usage of an exchange's answer as `p402 proxy` reads the same answer (its
    SSE and JSON readers): (input, output tokens), or None (the estimate stands in);
    "skip" for an exchange not compared (cut short, an odd path or status)."""
    from p402_server.gateways import proxy

    kind = KINDS.get(ex["path"])
    if kind is None or ex["stop_after"] is not None or ex["status"] != b"200":
        return "skip"
    if (ex["content_type"] or b"").startswith(b"text/event-stream"):
        seen, events = proxy.StreamUsage(kind), proxy.SseEvents()
        for piece in ex["answer"]:
            proxy._relay(events.feed(piece), seen, False)
        proxy._relay(events.close(), seen, False)
        usage = seen.usage
    else:
        try:
            usage = proxy.answer_usage(kind, b"".join(ex["answer"]))
        except (ValueError, AttributeError, UnicodeError, RecursionError):
            usage = None
    return None if usage is None else (usage["input_tokens"], usage["output_tokens"])


# --- the tests -------------------------------------------------------------------


def _exchange(key: str = "", headers: dict | None = None, body: bytes = VALID,
              status: bytes = b"200", answer: list[bytes] | None = None,
              ctype: bytes = b"application/json") -> dict:
    """A pinned exchange: `key` is replaced by the rig's meter key."""
    h = {":method": b"POST", ":path": b"/v1/chat/completions",
         "content-type": b"application/json", "authorization": b"Bearer KEY",
         **(headers or {})}
    answer = [b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'] if answer is None \
        else answer
    msgs = [pb.ProcessingRequest(request_headers=_hdrs(h)),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
            pb.ProcessingRequest(response_headers=_hdrs({":status": status,
                                                         "content-type": ctype}))]
    msgs += [pb.ProcessingRequest(response_body=pb.HttpBody(
        body=p, end_of_stream=i == len(answer) - 1)) for i, p in enumerate(answer)]
    return {"messages": msgs, "stop_after": None, "path": h[":path"], "status": status,
            "content_type": ctype, "answer": answer}


def _with_key(ex: dict, key: str) -> dict:
    """A copy of `ex` with the rig's meter key for KEY."""
    msgs = []
    for m in ex["messages"]:
        m = pb.ProcessingRequest.FromString(m.SerializeToString())
        if m.HasField("request_headers"):
            for h in m.request_headers.headers.headers:
                h.raw_value = h.raw_value.replace(b"KEY", key.encode())
                h.value = h.value.replace("KEY", key)
        msgs.append(m)
    return {**ex, "messages": msgs}


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(ex=_exchange())
@example(ex=_exchange(headers={"x-p402-attempt": "²".encode()}))
@example(ex=_exchange(headers={"x-p402-attempt": str(2**63).encode()}))
@example(ex=_exchange(body=b'{"model": "\\udfff"}'))
@example(ex=_exchange(body=b'{"model": "gpt-4o-mini", "max_tokens": %d}' % 2**70))
@example(ex=_exchange(body=DEEP))
@example(ex=_exchange(headers={"content-type": b"text/plain", "x-p402-model": b"gpt-4o-mini"},
                      body=DEEP))
@example(ex=_exchange(status=b"20\x00"))
@example(ex=_exchange(status=b"\xc2\xb2\xc2\xb2\xc2\xb2"))  # "²²²"
@example(ex=_exchange(answer=[b'{"usage": ' + b"[" * 5000 + b"]" * 5000 + b"}"]))
@given(ex=exchange())
def test_hostile_ext_proc_exchanges_are_answered_and_recorded_once(live, ex):
    ex = _with_key(ex, live["key"])
    start = len(live["logs"].records)
    answers, error = asyncio.run_coroutine_threadsafe(
        run(live, ex["messages"], ex["stop_after"]), live["loop"]).result(60)
    assert error is None, (error, answers[-1:])
    n = len(live["authorized"])
    check_answers(live, ex["messages"], answers)
    if len(live["authorized"]) > n:
        live["expected"][live["authorized"][-1]] = expected_usage(ex)
    if ex["stop_after"] is None:
        assert len(answers) == len(ex["messages"]) or (
            answers[-1].HasField("immediate_response")), (len(answers), len(ex["messages"]))
    check_logs(live, start)


USAGE_CHUNK = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'


@settings(max_examples=EXAMPLES // 2, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(stream=[USAGE_CHUNK + b"\r\r"], trailers=False)  # "\r" line ends
@example(stream=[USAGE_CHUNK], trailers=True)  # no blank line at the end
@example(stream=[USAGE_CHUNK[:20] + b"\ndata:" + USAGE_CHUNK[20:] + b"\n\n"],
         trailers=False)  # one event's data in two lines
@given(stream=streamed_answer(), trailers=st.booleans())
def test_a_streamed_answer_is_metered_as_the_proxy_meters_it(live, stream, trailers):
    live["runs"] = run_id = live.get("runs", 0) + 1
    ex = _exchange(headers={"x-p402-label-run": str(run_id).encode()},
                   body=json.dumps({"model": "gpt-4o-mini", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}).encode(),
                   answer=stream, ctype=b"text/event-stream")
    if trailers or not stream:
        if not stream:
            ex["messages"].append(pb.ProcessingRequest(response_body=pb.HttpBody()))
        ex["messages"][-1].response_body.end_of_stream = False
        ex["messages"].append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    ex = _with_key(ex, live["key"])
    start = len(live["logs"].records)

    async def exchange_and_event():
        answers, error = await run(live, ex["messages"], None)
        for _ in range(250):
            page = await live["admin"].query(labels={"run": str(run_id)}, page_size=5)
            if page.items:
                return answers, error, page.items
            await asyncio.sleep(0.02)
        return answers, error, []

    answers, error, events = asyncio.run_coroutine_threadsafe(
        exchange_and_event(), live["loop"]).result(60)
    assert error is None, error
    check_answers(live, ex["messages"], answers)
    [ev] = events
    want = expected_usage(ex)
    got = (ev.usage.input_tokens, ev.usage.output_tokens)
    assert (ev.evidence.value, ev.outcome.value) == (
        "ESTIMATED" if want is None else "REPORTED", "SUCCESS"), (want, got)
    if want is not None:
        assert got == want
    check_logs(live, start)


def _check_request(headers: dict[str, str], body: bytes, raw: bool, ext: dict[str, str],
                   size: int) -> ea.CheckRequest:
    http = ac.AttributeContext.HttpRequest(method=headers.get(":method", ""),
                                           path=headers.get(":path", ""), headers=headers,
                                           size=size)
    if raw:
        http.raw_body = body
    else:
        http.body = body.decode("utf-8", "replace")
    return ea.CheckRequest(attributes=ac.AttributeContext(
        request=ac.AttributeContext.Request(http=http), context_extensions=ext))


def _utf8(text: str) -> str:
    """A protobuf string as Envoy sends one: valid UTF-8 (lone surrogates replaced)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@st.composite
def check_request(draw) -> dict:
    """A CheckRequest's parts (`_check_request`); KEY stands for the rig's meter key."""
    raw_headers, body = draw(REQUESTS)
    # Envoy's CheckRequest headers map holds strings: bytes that are not UTF-8 arrive
    # replaced (or in header_map's raw_value, read by the same code as ext_proc's)
    headers = {k: v.decode("utf-8", "replace") for k, v in raw_headers.items()}
    ext_value = st.one_of(st.sampled_from(ODD + ["acme", "poor"]), st.text(max_size=12))
    ext = draw(st.dictionaries(st.sampled_from(
        ["customer", "feature", "model", "provider", "p402_key", "label.team", "label.",
         "label.\x00", "task"]), ext_value.map(_utf8), max_size=3))
    if "p402_key" in ext and draw(st.booleans()):
        ext["p402_key"] = "KEY"
    return {"headers": headers, "body": body, "raw": draw(st.booleans()),
            "ext": ext, "size": draw(st.sampled_from([0, 0, -1, 5, 2**63 - 1]))}


CHECK = {"headers": {":method": "POST", ":path": "/v1/chat/completions",
                     "content-type": "application/json", "authorization": "Bearer KEY"},
         "body": VALID, "raw": False, "ext": {}, "size": 0}


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@example(parts=dict(CHECK, headers={**CHECK["headers"], "x-p402-attempt": "²"}))
@example(parts=dict(CHECK, headers={**CHECK["headers"], "x-p402-attempt": str(2**31)}))
@example(parts=dict(CHECK, headers={**CHECK["headers"], "content-length": "9" * 40},
                    body=b""))
@example(parts=dict(CHECK, body=b'{"model": "\\uda00"}'))
@example(parts=dict(CHECK, body=b'{"model": "gpt-4o-mini", "max_tokens": %d}' % 2**63))
@example(parts=dict(CHECK, body=DEEP, raw=True))
@given(parts=check_request())
def test_hostile_check_requests_are_answered_ok_or_denied(live, parts):
    key = live["key"]
    req = _check_request(
        {k: v.replace("KEY", key) for k, v in parts["headers"].items()}, parts["body"],
        parts["raw"], {k: v.replace("KEY", key) for k, v in parts["ext"].items()},
        parts["size"])
    start = len(live["logs"].records)

    async def check():
        try:
            return await live["check"].Check(req, timeout=30)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()

    resp = asyncio.run_coroutine_threadsafe(check(), live["loop"]).result(60)
    assert isinstance(resp, ea.CheckResponse), resp
    if resp.status.code == code_pb2.OK:
        assert resp.HasField("ok_response"), resp
        rid = {h.header.key: h.header.value for h in resp.ok_response.headers}[
            "x-p402-reservation-id"]
        live["authorized"].append(rid)
        # Envoy forwards the request; the upstream's relay records it
        asyncio.run_coroutine_threadsafe(live["admin"].record(
            rid, input_tokens=1, output_tokens=1), live["loop"]).result(30)
    else:
        d = resp.denied_response
        assert resp.status.code in (code_pb2.INVALID_ARGUMENT, code_pb2.UNAUTHENTICATED,
                                    code_pb2.PERMISSION_DENIED, code_pb2.RESOURCE_EXHAUSTED,
                                    code_pb2.UNAVAILABLE), resp.status
        assert 400 <= d.status.code < 600 and d.status.code != 500, d.status
        _error_body(d.body.encode())
    check_logs(live, start)


def test_every_authorized_exchange_is_in_the_ledger_once(live):
    async def reservations():
        await asyncio.sleep(0.5)  # Records commit behind the answers
        seen: dict[str, int] = {}
        async for ev in live["admin"].export():
            if ev.outcome.value != "DENIED":
                seen[ev.reservation_id] = seen.get(ev.reservation_id, 0) + 1
                events[ev.reservation_id] = ev
        return seen

    events: dict = {}
    authorized = live["authorized"]
    assert authorized and len(set(authorized)) == len(authorized)
    seen = asyncio.run_coroutine_threadsafe(reservations(), live["loop"]).result(60)
    assert {r: n for r, n in seen.items() if n != 1} == {}
    assert sorted(seen) == sorted(authorized), (
        set(authorized) - set(seen), set(seen) - set(authorized))
    # each answer's usage counted as the proxy counts the same answer
    wrong = {}
    for rid, want in live["expected"].items():
        ev = events[rid]
        got = (ev.usage.input_tokens, ev.usage.output_tokens)
        if want != "skip" and (ev.evidence.value == "REPORTED", got) != (
                want is not None, want or got):
            wrong[rid] = (want, got, ev.evidence.value, ev.outcome.value)
    assert not wrong, list(wrong.values())[:5]
    refused = [r.getMessage() for r in live["logs"].records
               if "refused" in r.getMessage() or "failed" in r.getMessage()]
    assert not refused, refused[:3]

"""Envoy ext_proc: Process streams carrying the message sequences Envoy sends (its
ext_proc protocol: request headers, a buffered request body, response headers, a
buffered or streamed response body, trailers, an aborted stream) against a P402
server with ext_authz on, and the ledger checked after each."""
from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2",
                    reason="xds-protos is not installed (extra `envoy`)")

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: E402

import p402core  # noqa: E402

CATALOG = p402core.Catalog.default()
MESSAGES = [{"role": "user", "content": "Summarize the incident report, please. " * 8}]
USAGE = {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160,
         "prompt_tokens_details": {"cached_tokens": 20},
         "completion_tokens_details": {"reasoning_tokens": 0}}


def _hdrs(d: dict, end: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in d.items()]),
        end_of_stream=end)


class Rig:
    def __init__(self, stub, admin, meter_key):
        self.stub, self.admin, self.meter_key = stub, admin, meter_key

    def request(self, body: dict, **headers) -> list[pb.ProcessingRequest]:
        h = {":method": "POST", ":path": "/v1/chat/completions",
             "content-type": "application/json", "authorization": f"Bearer {self.meter_key}",
             "x-p402-customer": "acme", **{k.replace("_", "-"): v for k, v in headers.items()}}
        return [pb.ProcessingRequest(request_headers=_hdrs(h)),
                pb.ProcessingRequest(request_body=pb.HttpBody(
                    body=json.dumps(body).encode(), end_of_stream=True))]

    async def run(self, messages, *, stop_after: int | None = None):
        """Send the messages one at a time, each after the previous answer (as Envoy
        does); `stop_after`: cancel the stream after that many answers."""
        call = self.stub.Process()
        answers = []
        for i, m in enumerate(messages):
            await call.write(m)
            answers.append(await call.read())
            if stop_after is not None and len(answers) >= stop_after:
                call.cancel()
                return answers
            if answers[-1].HasField("immediate_response"):
                break
        await call.done_writing()
        return answers

    async def events(self, n=1, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            page = await self.admin.query(page_size=100)
            if len(page.items) >= n or time.monotonic() > deadline:
                return list(reversed(page.items))
            await asyncio.sleep(0.02)


@pytest.fixture
async def rig(tmp_path):
    from p402_client import AsyncP402Client
    from p402_server.ledger import open_store
    from p402_server.server import create_server, init_tenant

    store = await open_store(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    server, port = create_server("127.0.0.1:0", store=store, ext_authz=True)
    await server.start()
    _t, admin_key = await init_tenant(store, "ext-proc")
    admin = AsyncP402Client(f"127.0.0.1:{port}", api_key=admin_key, timeout=10.0)
    meter = await admin.create_key("envoy", ["meter"])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Rig(pb_grpc.ExternalProcessorStub(channel), admin, meter.api_key)
    finally:
        await channel.close()
        await admin.close()
        await server.stop(1.0)
        await store.close()


def _set_headers(common) -> dict:
    return {h.header.key: (h.header.raw_value or h.header.value.encode()).decode()
            for h in common.header_mutation.set_headers}


async def test_buffered_json_exchange_is_authorized_and_recorded(rig):
    answers = await rig.run([
        *rig.request({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50}),
        pb.ProcessingRequest(response_headers=_hdrs({":status": "200",
                                                     "content-type": "application/json"})),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=json.dumps(
            {"id": "x", "choices": [], "usage": USAGE}).encode(), end_of_stream=True)),
    ])
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers", "request_body", "response_headers", "response_body"]
    added = _set_headers(answers[1].request_body.response)
    assert added["x-p402-decision"] == "ALLOW" and added["x-p402-reservation-id"]
    assert not answers[1].request_body.response.HasField("body_mutation")  # within grant
    [ev] = await rig.events()
    assert ev.reservation_id == added["x-p402-reservation-id"]
    assert (ev.usage.input_tokens, ev.usage.output_tokens, ev.usage.cached_input_tokens) == \
        (120, 40, 20)
    assert ev.outcome.value == "SUCCESS" and ev.evidence.value == "REPORTED"
    assert ev.cost_nanos == CATALOG.cost_nanos("gpt-4o-mini", input_tokens=120,
                                               output_tokens=40, cached_input_tokens=20)


async def test_streamed_sse_with_lines_split_across_chunks_and_trailers(rig):
    frames = "".join(
        "data: " + json.dumps(c) + "\n\n" for c in (
            {"choices": [{"delta": {"content": "Hello"}}]},
            {"choices": [{"delta": {"content": " world"}}]},
            {"choices": [], "usage": USAGE})) + "data: [DONE]\n\n"
    raw = frames.encode()
    cuts = [0, 17, 60, 131, len(raw) - 9, len(raw)]  # mid-line, mid-JSON
    chunks = [raw[a:b] for a, b in zip(cuts, cuts[1:])]
    answers = await rig.run([
        *rig.request({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
                      "max_tokens": 100}),
        pb.ProcessingRequest(response_headers=_hdrs({":status": "200",
                                                     "content-type": "text/event-stream"})),
        *[pb.ProcessingRequest(response_body=pb.HttpBody(body=c)) for c in chunks],
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=False)),
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
    ])
    # the stream asked for usage it had not asked for: include_usage added, length kept right
    mutation = answers[1].request_body.response
    sent = json.loads(mutation.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert _set_headers(mutation)["content-length"] == str(len(mutation.body_mutation.body))
    assert answers[-1].WhichOneof("response") == "response_trailers"
    [ev] = await rig.events()
    assert (ev.usage.input_tokens, ev.usage.output_tokens) == (120, 40)
    assert ev.outcome.value == "SUCCESS"


async def test_hard_budget_clamps_in_the_body_or_denies_immediately(rig):
    await rig.admin.put_budget("acme-hard", limit_nanos=10**9, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    answers = await rig.run(rig.request({"model": "o3-mini", "messages": MESSAGES,
                                         "max_tokens": 10**6}))
    body = json.loads(answers[1].request_body.response.body_mutation.body)
    assert "max_tokens" not in body and 0 < body["max_completion_tokens"] < 10**6
    await rig.admin.put_budget("acme-hard", limit_nanos=1, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    answers = await rig.run(rig.request({"model": "gpt-4o", "messages": MESSAGES}))
    imm = answers[-1].immediate_response
    assert imm.status.code == 402
    err = json.loads(imm.body)
    assert err["error"]["code"] == "budget.exceeded"


async def test_upstream_error_records_provider_error(rig):
    await rig.run([
        *rig.request({"model": "gpt-4o-mini", "messages": MESSAGES}),
        pb.ProcessingRequest(response_headers=_hdrs({":status": "503",
                                                     "content-type": "application/json"})),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b'{"error":{}}',
                                                       end_of_stream=True)),
    ])
    [ev] = await rig.events()
    assert ev.outcome.value == "PROVIDER_ERROR" and ev.cost_nanos == 0


async def test_aborted_stream_records_what_was_streamed(rig):
    chunk = ("data: " + json.dumps({"choices": [{"delta": {"content": "x" * 40}}]})
             + "\n\n").encode()
    await rig.run([
        *rig.request({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}),
        pb.ProcessingRequest(response_headers=_hdrs({":status": "200",
                                                     "content-type": "text/event-stream"})),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk)),
    ], stop_after=5)
    [ev] = await rig.events(timeout=10)
    assert ev.outcome.value == "CANCELLED" and ev.evidence.value == "ESTIMATED"
    assert ev.usage.output_tokens == 20  # two deltas of 40 bytes: a quarter of the bytes


async def test_no_key_is_an_immediate_401_and_nothing_is_held(rig):
    msgs = rig.request({"model": "gpt-4o-mini", "messages": MESSAGES})
    msgs[0] = pb.ProcessingRequest(request_headers=_hdrs(
        {":method": "POST", ":path": "/v1/chat/completions",
         "content-type": "application/json"}))
    answers = await rig.run(msgs)
    assert answers[-1].immediate_response.status.code == 401
    assert await rig.events(timeout=0.3) == []


def _headers_only(rig, **extra) -> pb.ProcessingRequest:
    """Request headers of a POST whose body Envoy does not send (request_body_mode
    NONE): not end_of_stream, and no request_body message follows."""
    return pb.ProcessingRequest(request_headers=_hdrs({
        ":method": "POST", ":path": "/v1/chat/completions", "content-length": "900",
        "content-type": "application/json", "authorization": f"Bearer {rig.meter_key}",
        "x-p402-customer": "acme", **extra}))


def _answer() -> list[pb.ProcessingRequest]:
    return [pb.ProcessingRequest(response_headers=_hdrs({
                ":status": "200", "content-type": "application/json"})),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=json.dumps(
                {"id": "x", "choices": [], "usage": USAGE}).encode(), end_of_stream=True))]


async def test_body_mode_none_is_decided_on_the_headers_with_x_p402_model(rig):
    answers = await rig.run([_headers_only(rig, **{"x-p402-model": "gpt-4o-mini"}),
                             *_answer()])
    added = _set_headers(answers[0].request_headers.response)
    assert added["x-p402-decision"] == "ALLOW" and added["x-p402-reservation-id"]
    [ev] = await rig.events()
    assert ev.reservation_id == added["x-p402-reservation-id"]
    assert ev.model == "gpt-4o-mini" and ev.usage.output_tokens == 40


async def test_a_body_after_a_headers_decision_gets_its_cap_and_no_second_hold(rig):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10**6}
    answers = await rig.run([
        _headers_only(rig, **{"x-p402-model": "gpt-4o-mini"}),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(body).encode(),
                                                      end_of_stream=True)),
        *_answer()])
    added = _set_headers(answers[0].request_headers.response)
    rid = added["x-p402-reservation-id"]
    # The body is not authorized again: no reservation header on it, one event.
    assert "x-p402-reservation-id" not in _set_headers(answers[1].request_body.response)
    new = json.loads(answers[1].request_body.response.body_mutation.body)
    assert 0 < new["max_tokens"] < 10**6  # lowered to the headers' grant
    [ev] = await rig.events()
    assert ev.reservation_id == rid


async def test_a_request_never_decided_does_not_get_its_answer(rig, caplog):
    # Body mode NONE and no x-p402-model: nothing to decide on before the upstream.
    answers = await rig.run([_headers_only(rig), *_answer()])
    assert answers[0].request_headers.response.header_mutation.set_headers == []
    refused = answers[1].immediate_response
    assert refused.status.code == 500
    assert json.loads(refused.body)["error"]["code"] == "p402_not_decided"
    assert "request_body_mode BUFFERED" in json.loads(refused.body)["error"]["message"]
    assert await rig.events(timeout=0.3) == []
    assert any(r.levelname == "ERROR" and "without a decision" in r.getMessage()
               for r in caplog.records)


async def test_a_request_that_sets_nothing_is_refused_naming_the_field(rig):
    call = rig.stub.Process()
    await call.write(pb.ProcessingRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), 10)  # never answered: TimeoutError
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request:")
    # After the headers of an authorized request, the stream's end records it.
    call = rig.stub.Process()
    first = rig.request({"model": "gpt-4o-mini", "max_tokens": 5,
                         "messages": [{"role": "user", "content": "hi"}]})
    for m in first:
        await call.write(m)
        await call.read()
    await call.write(pb.ProcessingRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), 10)  # never answered: TimeoutError
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (ev,) = await rig.events()
    assert ev.outcome.value == "CANCELLED"

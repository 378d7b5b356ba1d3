"""Envoy external processing: `envoy.service.ext_proc.v3.ExternalProcessor/Process`,
the Record half of metering traffic that goes through Envoy.

Owns one HTTP exchange per Process stream: authorize on the request, clamp or refuse
it, read the usage from the response and record it — in the P402 server's own loop,
runtime and key cache (`p402 serve --ext-authz` serves it on the gRPC port beside
Authorization/Check; stubs from `xds-protos`, extra `envoy`). envoy.py owns the
request's translation (key, owners, labels, model, cap) and the denial bodies; the
proxy owns the cap rule and the usage parsing (`proxy.cap_edits`, `proxy.usage_from`):
this module only drives them from Envoy's messages.

Processing mode it needs (server/envoy/envoy.yaml has an example Envoy config): request_header_mode SEND,
request_body_mode BUFFERED (the model and the output cap are in the JSON body),
response_header_mode SEND, response_body_mode STREAMED (SSE answers are read as they
pass, never held) or BUFFERED, trailers optional. With request_body_mode NONE the
model comes from an `x-p402-model` header (input bytes from content-length) and the
body is not seen, so nothing is clamped. A request that reaches its response without
a decision (body mode NONE and no x-p402-model) is never let through unmetered: its
answer is replaced by a 500 naming the misconfiguration (the upstream was called,
unauthorized; the caller gets nothing of it), logged as an error.

Per exchange
1. request_headers: the key (authorization: Bearer p402_…, or x-p402-key), owners,
   labels, retries as for ext_authz. Answered CONTINUE; the decision waits for the
   body, unless the request has none or names its model in x-p402-model: then it is
   decided on the headers, once (a body that follows gets the cap rule of step 2
   against that grant, and is not authorized again).
2. request_body: Authorize (input bytes = the body's length). DENY: an immediate
   response 402 / 429 (Retry-After) / 403 / 401 / 400 with the OpenAI-style JSON body,
   as ext_authz answers. ALLOW / WARN: CONTINUE, adding `x-p402-reservation-id` and
   `x-p402-decision` upstream (and removing `authorization` when
   EnvoyConfig.strip_authorization); the body is rewritten (a body mutation, with its
   content-length) only when the cap must change (the proxy's rule: lowered to the
   grant, added under a HARD budget, never `max_tokens` to a reasoning model) or a
   chat stream needs `stream_options.include_usage` to report usage.
3. response_headers: the status is kept (one that is not three ASCII digits reads
   as 200: the answer's usage, else the estimate, is recorded); CONTINUE.
4. response_body: JSON read whole at end_of_stream; SSE read event by event as the
   proxy reads one (proxy.SseEvents: an event split across chunks is joined, any
   line ends, data in several lines), the final usage chunk (chat) or
   `response.completed` (responses) gives the usage. CONTINUE each chunk.
5. At the end of the response (end_of_stream or trailers) the reservation is
   recorded: SUCCESS with the usage (or the estimate, ESTIMATED, when the answer had
   none); an upstream status >= 400: PROVIDER_ERROR with no usage. A stream that ends
   before the response did (the client went away, Envoy reset it): CANCELLED with what
   was streamed so far (one token per content delta, at least a quarter of its bytes).

Not run against an Envoy binary here (no network to fetch one): the tests drive this
service with the message sequences Envoy's ext_proc protocol documents (buffered and
streamed bodies, trailers, an aborted stream).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from p402.v1 import common_pb2
from p402_client import _convert as cv
from p402_server.api.auth import METER
from p402_server.gateways import envoy, proxy
from p402_server.runtime.shared import new_ulid
from p402_server.wire.errors import ServiceError
from p402core import InvalidArgument

log = logging.getLogger("p402.server.ext_proc")

_PENDING: set = set()  # Records of streams that ended early, until they are written
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
_KINDS = (("/chat/completions", "chat"), ("/responses", "responses"),
          ("/embeddings", "embeddings"))


def _header_map(headers) -> dict[str, str]:
    return {h.key.lower(): h.value or h.raw_value.decode("utf-8", "replace")
            for h in headers.headers.headers}


def _continue(kind: str, common: pb.CommonResponse | None = None) -> pb.ProcessingResponse:
    common = common or pb.CommonResponse()
    if kind in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{kind: pb.HeadersResponse(response=common)})
    return pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    # raw_value: Envoy's current field for header values (value is deprecated there)
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def _immediate(denied: "envoy._Denied") -> pb.ProcessingResponse:
    check = denied.response()  # the same status, headers and body as ext_authz
    d = check.denied_response
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=d.status.code),
        headers=pb.HeaderMutation(set_headers=[_set(h.header.key, h.header.value)
                                               for h in d.headers]),
        body=d.body.encode(), details=f"p402: {denied.code}"))


class _Exchange:
    """One HTTP request/response through Envoy (module docstring)."""

    def __init__(self, service: "ExtProcService"):
        self.s = service
        self.headers: dict[str, str] = {}
        self.kind = ""
        self.auth = None        # AuthorizeResponse once allowed
        self.rt = None
        self.status = 0
        self.sse = False
        self.buffer = b""       # a JSON body
        self.seen = proxy.StreamUsage("chat")  # an SSE answer as it passes
        self.events = proxy.SseEvents()  # its events, whole, as its chunks arrive
        self.recorded = False
        self.nbytes = 0
        self.decided = False    # Authorize asked (allowed or refused)

    # --- request ---------------------------------------------------------------

    async def request_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        self.headers = _header_map(msg)
        path = self.headers.get(":path", "").split("?", 1)[0]
        self.kind = next((k for suffix, k in _KINDS if path.endswith(suffix)), "")
        self.seen = proxy.StreamUsage(self.kind or "chat")
        if msg.end_of_stream or self.headers.get("x-p402-model"):
            # No body will come, or none may (request_body_mode NONE): decide now.
            return await self._decide(b"", "request_headers")
        return _continue("request_headers")

    async def request_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        self.buffer += msg.body
        if not msg.end_of_stream:  # STREAMED request bodies: wait for the whole
            return _continue("request_body")
        body, self.buffer = self.buffer, b""
        if self.decided:
            # Decided on the headers: the body gets that grant's cap, no second hold.
            if self.auth is None:
                return _continue("request_body")
            common = pb.CommonResponse()
            self._edit_body(common, body, None)
            return _continue("request_body", common)
        return await self._decide(body, "request_body")

    async def _decide(self, body: bytes, kind: str) -> pb.ProcessingResponse:
        self.decided = True
        try:
            key, req, parsed = envoy.authorize_from(self.headers, {}, body, 0, self.s.config)
            if not key:
                raise envoy._Denied(401, 16, "invalid_request_error", "invalid_api_key",
                                    "a P402 API key is required: authorization: Bearer "
                                    "p402_… (or x-p402-key)")
            try:
                info = await self.s.auth.authenticate(envoy._KeyContext(key), METER,
                                                      "Process", "meter")
                rt = (self.s.runtime.tenants.get(info.tenant_id)
                      or await self.s.runtime.get(info.tenant_id))
                resp = await rt.authorize_exact(req)
            except ServiceError as exc:
                raise envoy._service_error(exc) from None
            except InvalidArgument as exc:
                raise envoy._bad(exc.field, exc.message) from None
            if resp.decision == common_pb2.DECISION_DENY:
                raise envoy._denial(resp)
        except envoy._Denied as denied:
            return _immediate(denied)
        self.auth, self.rt, self.nbytes = resp, rt, req.input_bytes
        decision = common_pb2.Decision.Name(resp.decision).removeprefix("DECISION_")
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[
            _set("x-p402-reservation-id", resp.reservation_id),
            _set("x-p402-decision", decision)]))
        if self.s.config.strip_authorization:
            common.header_mutation.remove_headers.append("authorization")
        self._edit_body(common, body, parsed)
        return _continue(kind, common)

    def _edit_body(self, common: pb.CommonResponse, body: bytes, parsed) -> None:
        """The granted cap (and a chat stream's include_usage) written into a JSON
        body that needs them, as a body mutation with its content-length."""
        resp = self.auth
        if not parsed and body and self.kind in ("chat", "responses"):
            # Not read for the decision (not JSON by its content type, or too large
            # to parse there): the cap is still written into a JSON body.
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):
                parsed = None
        if isinstance(parsed, dict) and self.kind in ("chat", "responses"):
            try:
                cap_field, cap = proxy.requested_cap(self.kind, parsed)
            except proxy.ProxyError:
                cap_field, cap = "", 0
            edits = proxy.cap_edits(self.kind, str(parsed.get("model", "")), parsed,
                                    cap_field, cap, resp.output_token_cap,
                                    _under_hard_budget(resp))
            if self.kind == "chat" and parsed.get("stream"):
                so = parsed.get("stream_options")
                if not (isinstance(so, dict) and so.get("include_usage")):
                    edits["stream_options"] = {**(so if isinstance(so, dict) else {}),
                                               "include_usage": True}
            if edits:
                new = json.dumps(proxy.edited(parsed, edits)).encode()
                common.body_mutation.body = new
                common.header_mutation.set_headers.append(_set("content-length",
                                                               str(len(new))))

    # --- response --------------------------------------------------------------

    async def response_headers(self, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        if not self.decided:
            # The request went upstream without a decision: Envoy sent neither its
            # body (request_body_mode NONE) nor an x-p402-model header. Its answer
            # never reaches the caller: no call passes unauthorized and unmetered.
            log.error("ext_proc: a request reached its response without a decision; "
                      "configure request_body_mode BUFFERED, or send x-p402-model")
            return _immediate(envoy._Denied(
                500, 13, "server_error", "p402_not_decided",
                "P402 saw neither this request's body nor an x-p402-model header, so "
                "it was not authorized: the Envoy ext_proc filter must send the "
                "request body (request_body_mode BUFFERED) or the request must name "
                "its model in x-p402-model"))
        headers = _header_map(msg)
        self.status = _status(headers.get(":status", ""))
        self.sse = headers.get("content-type", "").startswith("text/event-stream")
        if msg.end_of_stream:
            await self._finish()
        return _continue("response_headers")

    async def response_body(self, msg: pb.HttpBody) -> pb.ProcessingResponse:
        if self.auth is not None and self.status < 400:
            if self.sse:
                self._read_sse(msg.body)
            else:
                self.buffer += msg.body
        if msg.end_of_stream:
            await self._finish()
        return _continue("response_body")

    def _read_sse(self, chunk: bytes, end: bool = False) -> None:
        """Each event of an SSE answer, read as the proxy reads one (any line ends,
        data in several lines; `end`: the last event, without its blank line)."""
        if self.events is None:
            return  # an event too long to read: the stream's usage is not read
        try:
            blocks = self.events.feed(chunk)
            if end:
                blocks += self.events.close()
        except aiohttp.ClientPayloadError as exc:  # longer than proxy.MAX_EVENT_BYTES
            log.warning("%s: its usage is not read, the estimate stands in", exc)
            self.events = None
            return
        for block in blocks:
            self.seen.observe_data(proxy._event_data(block))

    async def response_trailers(self) -> pb.ProcessingResponse:
        await self._finish()
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    # --- recording ---------------------------------------------------------------

    async def _finish(self, cancelled: bool = False) -> None:
        if self.auth is None or self.recorded:
            return
        self.recorded = True
        usage, estimated, outcome = None, False, common_pb2.OUTCOME_SUCCESS
        if self.status >= 400:
            outcome = common_pb2.OUTCOME_PROVIDER_ERROR
            usage, estimated = {}, True
        elif cancelled:
            outcome = common_pb2.OUTCOME_CANCELLED
            usage = self.seen.usage or self.seen.estimate(self.auth)
            estimated = self.seen.usage is None
        else:
            if self.sse:
                self._read_sse(b"", end=True)
                usage = self.seen.usage
                if self.seen.failed:
                    outcome = common_pb2.OUTCOME_PROVIDER_ERROR
            elif self.buffer:
                try:
                    answer = json.loads(self.buffer)
                    usage = proxy.usage_from(self.kind or "chat", answer.get("usage"),
                                             answer.get("service_tier"),
                                             proxy.web_searches(answer))
                except (ValueError, AttributeError, RecursionError):
                    usage = None
            if usage is None:
                estimated = True
                usage = {"input_tokens": self.auth.estimated_input_tokens,
                         "output_tokens": 0 if self.kind == "embeddings"
                         else self.auth.estimated_output_tokens}
        req = cv.record_request(self.auth.reservation_id, event_id="evt_" + new_ulid(),
                                outcome=outcome, input_bytes=self.nbytes,
                                usage_estimated=estimated, **usage)
        try:
            await self.rt.record(req)
        except Exception as exc:  # noqa: BLE001 - the reservation expires at its estimate
            log.error("record of reservation %s failed (%s); its hold will expire and be "
                      "committed at its estimate", self.auth.reservation_id, exc)


def _status(text: str) -> int:
    """An HTTP status: three ASCII digits. Anything else (none, "abc", "²", "-1",
    "20\\x00") reads as 200: the answer's usage, or else the estimate, is recorded,
    never nothing for an answer that may have been served."""
    return int(text) if len(text) == 3 and text.isascii() and text.isdigit() else 200


def _under_hard_budget(resp) -> bool:
    """proxy._must_cap's rule on an AuthorizeResponse: a HARD budget is in scope."""
    return any(b.enforcement == common_pb2.ENFORCEMENT_HARD for b in resp.budgets)


class ExtProcService(pb_grpc.ExternalProcessorServicer):
    """Envoy's ExternalProcessor over the server's runtime and key cache."""

    def __init__(self, runtime, auth, config: envoy.EnvoyConfig | None = None):
        self.runtime = runtime
        self.auth = auth
        self.config = config or envoy.EnvoyConfig()

    async def Process(self, request_iterator, context):
        ex = _Exchange(self)
        started = time.monotonic()
        try:
            async for msg in request_iterator:
                which = msg.WhichOneof("request")
                if which == "request_headers":
                    yield await ex.request_headers(msg.request_headers)
                elif which == "request_body":
                    yield await ex.request_body(msg.request_body)
                elif which == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif which == "response_headers":
                    yield await ex.response_headers(msg.response_headers)
                elif which == "response_body":
                    yield await ex.response_body(msg.response_body)
                elif which == "response_trailers":
                    yield await ex.response_trailers()
                else:
                    # Envoy always sets one; without an answer the sender would wait.
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "request: a ProcessingRequest sets one of request_headers, "
                        "request_body, request_trailers, response_headers, response_body "
                        f"or response_trailers (got {which or 'none'})")
        finally:
            if ex.auth is not None and not ex.recorded:
                # The stream ended before the response did: the client went away or
                # Envoy reset it. Recorded in the background of the stream's end.
                log.info("ext_proc stream ended %.1f s in before the response did; "
                         "recording CANCELLED", time.monotonic() - started)
                # A task of its own: the stream's task may be cancelled itself.
                task = asyncio.get_running_loop().create_task(ex._finish(cancelled=True))
                _PENDING.add(task)
                task.add_done_callback(_PENDING.discard)


def add_to_server(server, runtime, auth, config: envoy.EnvoyConfig | None = None) -> None:
    pb_grpc.add_ExternalProcessorServicer_to_server(ExtProcService(runtime, auth, config),
                                                    server)


__all__ = ["ExtProcService", "add_to_server", "SERVICE_NAME"]

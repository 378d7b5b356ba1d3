"""`p402 proxy`: an OpenAI-compatible HTTP endpoint that meters every call it forwards.

Owns the HTTP side of metering OpenAI-style traffic (aiohttp): the caller's P402 key
and owners from headers, Authorize before the upstream call, the output cap written
into the forwarded request, the upstream key substituted for the caller's, usage read
back (from the last stream chunk when streaming) and recorded, and OpenAI-style
errors for denials. Nothing here prices or decides: the P402 server does.

Endpoints: POST /v1/chat/completions (JSON and SSE), /v1/responses (JSON and SSE),
/v1/embeddings (metered by tokens: every usage detail OpenAI reports, the service tier
and Responses' web-search calls); POST /v1/images/generations and /v1/images/edits
(per image of the size and quality asked, plus gpt-image token usage),
/v1/audio/transcriptions and /v1/audio/translations (multipart: the duration or the
token usage the answer reports; reserved on `x-p402-audio-ms` when declared, else on
the upload's size at 16 kbit/s), /v1/audio/speech (per character of `input`; speech
answers carry no usage, so its event is ESTIMATED) — see `media_plan` and
`media_usage`; GET /v1/models (passed through for a valid P402 key). Any other path
(files, batches, fine-tuning, moderations, realtime, …) answers 404: the proxy never
forwards traffic it cannot meter.

The caller
- `Authorization: Bearer p402_…` — a P402 key with the `meter` scope; the tenant comes
  from it. It is never sent upstream: the upstream gets the key of the proxy's own
  configuration (`--upstream-key-env`, default OPENAI_API_KEY).
- Owners from `x-p402-customer`, `x-p402-feature`, `x-p402-workflow`, `x-p402-task`,
  `x-p402-department`, `x-p402-employee`; labels from `x-p402-label-<key>`; retries
  attributed with `x-p402-attempt` and `x-p402-retry-of`. Header names are
  case-insensitive; a label key is lower-cased (HTTP does not keep case). Owners are
  never read from the request body (callers could dodge attribution).

How P402 is reached (a choice), always through the P402 Python client's API, so the
proxy gets exactly the server's key checks, tenant isolation, idempotent retries,
durability and error mapping:
- `--db URL` (embedded): P402's runtime and group-commit writer run in the proxy's
  process and the client's calls go straight to the meter service's methods
  (inprocess.py: no gRPC, no serialization; a decision in microseconds). With
  `--lease on` on a PostgreSQL ledger the proxy is one more process of the fleet
  (HARD budgets leased in slices, config sync, cross-process settlement).
- `--target HOST:PORT`: a running `p402 serve`, over gRPC: Authorize on one
  StreamAuthorizeBatches stream per caller key (the requests waiting together share a
  message), Records in RecordBatch calls.

Per call
1. Authorize(model, owners, labels, input_bytes = UTF-8 bytes of the prompt text,
   max_output_tokens = the request's cap) with the caller's key.
2. DENY: 402 (a budget reason; the budget named in the message and in
   `p402.budget_id`), 429 with Retry-After (policy.rate_limited only), 404 for a model
   without a price (`model_not_found`, as OpenAI answers an unknown model), else 403
   (a policy; its reason is the code); body `{"error": {"message", "type", "code",
   "param"}}` with `code` the first reason code, plus `"p402": {decision, reasons,
   rule_ids, …}`.

Errors are always OpenAI-style JSON, including what aiohttp refuses before a handler
runs (`ProxyRunner`): 400 malformed JSON (a lone "\\ud800" escape included) or an
invalid header character, 413 a body over 32 MiB, 431 a header line too long or too
many headers. Such a refusal is logged as one line naming the kind of fault, never
the request's bytes, headers or key.
3. ALLOW/WARN: a caller's cap above the granted `output_token_cap` is lowered to
   it, in the parameter the caller used (`max_completion_tokens`/`max_tokens` for
   chat, `max_output_tokens` for responses). A caller without a cap gets the grant
   as its cap only when the call must not spend past its reservation, i.e. a HARD
   budget is in scope (a grant clamped to fit one included); otherwise it goes uncapped and
   its Record settles the actual cost (any excess is the event's overrun). Chat on
   a model that takes `max_completion_tokens` (o-series, gpt-5 family, codex-mini)
   never gets `max_tokens`: the cap goes into `max_completion_tokens`, and a
   caller's `max_tokens` is moved there. Streaming chat gets `stream_options.include_usage = true`;
   the usage chunk (and the `"usage": null` of the other chunks) are stripped again
   when the caller had not asked for them.
4. Record (queued: see "Records behind the answer") with the upstream's usage:
   SUCCESS; an upstream HTTP error: PROVIDER_ERROR with zero usage, the upstream's status and body passed through; no answer in time:
   TIMEOUT (504); unreachable: PROVIDER_ERROR (502). A caller that disconnects
   mid-stream: CANCELLED, with the estimate's input tokens and the output tokens
   streamed so far (one per content chunk, at least ceil(bytes / 4): never less
   than what the caller received). A stream that ends without usage (an upstream
   that ignores include_usage) records the same estimate with SUCCESS; so does a
   usage whose totals are not token counts (a string, a float, a negative number,
   more than MAX_TOKENS: logged, never taken for zero), evidence ESTIMATED.

Records behind the answer
- The proxy gives each Record its event id and queues it (one `AsyncRecorder` per
  caller key); the caller gets its answer as soon as the upstream's is relayed, and
  the Records go out behind it in RecordBatch calls (committed by the group-commit
  writer), each batch sent once it is full or its oldest Record has waited 10 ms.
  Nothing waits for the ledger on the response path.
- The queue is bounded (10,000 Records per key): when it is full, the proxy waits
  for room before answering (backpressure); nothing is dropped. A Record that still
  finds no room after 30 s, or that is refused (a usage out of range, checked when
  its batch is built; or by P402), is logged.
- The reservation is the safety net: if the proxy dies before a queued Record
  commits (or the Record is lost as above), its hold expires at its TTL and is
  committed at its estimate (outcome EXPIRED, evidence ESTIMATED), which is never
  less than what the call could cost: spend is never under-counted. Holds reach the
  ledger behind the decision, every `holds_flush_interval_seconds` (0.25 s): in
  process (`--db`), a crash that allows no flush (SIGKILL) loses the calls whose
  hold was made since its last completed flush (one interval; longer while the
  database is slow to take the holds) and whose Record had not committed, the ones
  it cut off and those answered in about its last 10 ms; started again, it settles
  the saved holds of the others at their estimate. With `--target`, the
  server keeps the holds of a proxy that dies, and a server that dies gets the
  proxy's queued Records again once it is back. There a Record names the call's
  model, provider, owners and labels as Authorize did, so one whose hold died
  unsaved with the server (made in its last interval) is metered all the same, at
  the upstream's usage (reason `reservation.unknown`).
- On shutdown the queues are flushed before the runtime (embedded) stops.

Response headers: `x-p402-reservation-id`, `x-p402-decision`, and on non-streamed
answers `x-p402-event-id` (the event the Record will commit; its cost is in the
ledger, read it with Query or `p402 events`).

One room, though long: each endpoint (chat, responses, embeddings, images, audio)
runs the same parse, authorize, forward, read-usage, record path with the same
headers, errors and stream relay; they are kept together so that path stays one.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web, web_protocol

from p402_client.openai import usage_from_openai
from p402_server.gateways import jsonio
from p402_server.gc_policy import tune_gc
from p402_server.httpconn import runner_class
from p402_server.listen import busy, listen_error
from p402core import (
    MAX_TOKENS,
    NULL_USAGE_END,
    ChatShape,
    chat_content,
    chat_events,
    null_usage_at_end,
    utf8_length,
)
from p402core._units import image_name

log = logging.getLogger("p402.proxy")

OWNER_HEADERS = ("customer", "feature", "workflow", "task", "department", "employee")
LABEL_PREFIX = "x-p402-label-"
METERED = {"chat/completions": "chat", "responses": "responses", "embeddings": "embeddings"}
# Endpoints priced by what they make or take rather than by text tokens.
MEDIA = {"images/generations": "images", "images/edits": "images",
         "audio/transcriptions": "transcription", "audio/translations": "transcription",
         "audio/speech": "speech"}
MAX_IMAGES = 10           # OpenAI's own bound on `n`
IMAGE_TOKENS_MAX = 6240   # output tokens of the largest gpt-image-1 image (high, 1536x1024)
AUDIO_BYTES_PER_MS = 2    # 16 kbit/s: the lowest bitrate assumed when a duration is not declared
AUDIO_MS_HEADER = "x-p402-audio-ms"
# Caller headers worth forwarding upstream (everything else, notably Authorization
# and x-p402-*, stays here).
FORWARD_HEADERS = ("accept", "openai-beta", "openai-organization", "openai-project",
                   "idempotency-key", "x-request-id", "user-agent")
# Upstream response headers passed back (hop-by-hop and length headers are not).
PASS_BACK_HEADERS = ("retry-after", "x-request-id", "openai-processing-ms",
                     "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                     "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                     "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
MAX_BODY_BYTES = 32 * 1024 * 1024
# One SSE event of an upstream's stream, at most (a Responses API `response.completed`
# carries the whole answer): past this without a blank line, the stream is broken.
MAX_EVENT_BYTES = 16 * 1024 * 1024
PING_CACHE_SECONDS = 60.0
# The application's Proxy (its meter: queued Records, flush) for whoever runs it.
PROXY_KEY = web.AppKey("p402_proxy", object)


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy forwards to and how (CLI flags of `p402 proxy`)."""

    upstream: str  # base URL, e.g. https://api.openai.com/v1 ("/v1" added if absent)
    upstream_key: str = ""  # the key sent upstream ("" sends none)
    provider: str = "openai"  # provider name given to Authorize (price lookup)
    upstream_timeout: float = 600.0  # seconds for a whole upstream answer
    connect_timeout: float = 10.0

    @property
    def upstream_base(self) -> str:
        base = self.upstream.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


class ProxyError(Exception):
    """An answer the proxy gives itself, OpenAI-style (status, type, code, param)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.headers, self.extra = param, headers or {}, extra

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": {"message": self.message, "type": self.type,
                                          "code": self.code, "param": self.param}}
        if self.extra:
            body["p402"] = self.extra
        return web.json_response(body, status=self.status, headers=self.headers)


# ------------------------------------------------------------------ the P402 side


class ClientMeter:
    """P402 through the Python client, one client and one background recorder per
    caller key (bounded LRU).

    `target` is a running server (`AsyncP402Client` over gRPC; channels to one
    target share their connections, so a client per key costs little), or
    `embedded` an `inprocess.EmbeddedP402` in this process (the same servicers
    called directly: no transport). Records go through an `AsyncRecorder` per key:
    queued with their event id at once, sent in RecordBatch calls behind the
    caller's answer; a full queue makes the proxy wait (`record_wait` seconds, then
    the record is logged as lost and its hold expires at its estimate).
    """

    def __init__(self, target: str | None = None, *, timeout: float = 5.0,
                 max_keys: int = 256, embedded=None, record_queue: int = 10_000,
                 record_batch: int = 500, record_wait: float = 30.0,
                 record_linger: float = 0.01):
        if (target is None) == (embedded is None):
            raise ValueError("ClientMeter needs a target or an embedded runtime")
        self.target = target or "embedded"
        self.embedded = embedded
        self.timeout = timeout
        self.max_keys = max_keys
        self.record_queue, self.record_batch = record_queue, record_batch
        self.record_wait = record_wait
        self.record_linger = record_linger
        self._clients: OrderedDict[str, Any] = OrderedDict()
        self._recorders: dict[str, Any] = {}
        self._pipelines: dict[str, Any] = {}
        self._pinged: dict[str, float] = {}

    def _connect(self, api_key: str):
        # retries=0 on Authorize would skip the client-made reservation id; keep the
        # client's default retries: a retried Authorize is idempotent.
        if self.embedded is not None:
            return self.embedded.client(api_key, timeout=self.timeout)
        from p402_client import AsyncP402Client

        return AsyncP402Client(self.target, api_key=api_key, timeout=self.timeout)

    def client(self, api_key: str):
        c = self._clients.get(api_key)
        if c is not None:
            self._clients.move_to_end(api_key)
            return c
        c = self._connect(api_key)
        self._clients[api_key] = c
        if len(self._clients) > self.max_keys:
            old_key, old = self._clients.popitem(last=False)
            self._pinged.pop(old_key, None)
            asyncio.ensure_future(self._retire(old, self._recorders.pop(old_key, None),
                                               self._pipelines.pop(old_key, None)))
        return c

    async def authorize(self, api_key: str, model: str, **kw: Any):
        """Authorize with `api_key`: in process, a direct call; to a server, on the
        key's StreamAuthorizeBatches stream (p402_client.pipeline), not a unary RPC."""
        if self.embedded is not None:
            return await self.client(api_key).authorize(model, **kw)
        pipe = self._pipelines.get(api_key)
        if pipe is None:
            from p402_client import AuthorizePipeline

            pipe = self._pipelines[api_key] = AuthorizePipeline(self.client(api_key))
        return await pipe.authorize(model, **kw)

    def recorder(self, api_key: str):
        """The background recorder of `api_key`'s client."""
        r = self._recorders.get(api_key)
        if r is None:
            from p402_client import AsyncRecorder

            # Records are made here, from the upstream's answer: checked when their
            # batch is built, off the response path (a refused one is logged, and its
            # hold expires at its estimate, as for one P402 refuses).
            # Batched over `record_linger` seconds too: nothing waits for a Record,
            # and at a few calls at a time one batch (and one ledger commit) per
            # call cost more than the call's own metering.
            r = AsyncRecorder(self.client(api_key), max_queue=self.record_queue,
                              batch_size=self.record_batch, put_timeout=self.record_wait,
                              fail_open=False, validate="send", linger=self.record_linger)
            self._recorders[api_key] = r
        return r

    @staticmethod
    async def _retire(client, recorder, pipeline=None) -> None:
        if pipeline is not None:
            await pipeline.aclose()
        if recorder is not None:
            await recorder.aclose()  # flushes what it holds first
        await client.close()

    async def check_key(self, api_key: str) -> None:
        """Raise the client's error unless the key is valid (cached a minute)."""
        now = time.monotonic()
        if self._pinged.get(api_key, 0.0) > now:
            return
        await self.client(api_key).ping()
        self._pinged[api_key] = now + PING_CACHE_SECONDS

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued Record is sent; False if `timeout` passed first."""
        results = await asyncio.gather(*(r.flush(timeout)
                                         for r in list(self._recorders.values())))
        return all(results)

    async def close(self) -> None:
        """Flush and stop the recorders, then close the clients."""
        recorders, self._recorders = dict(self._recorders), {}
        pipelines, self._pipelines = dict(self._pipelines), {}
        clients, self._clients = dict(self._clients), OrderedDict()
        await asyncio.gather(*(self._retire(c, recorders.get(k), pipelines.get(k))
                               for k, c in clients.items()))


def _p402_error(exc: Exception) -> ProxyError:
    """A P402 client error as the HTTP answer the caller gets."""
    from p402_client import errors as e

    msg = getattr(exc, "message", str(exc))
    if isinstance(exc, e.Unauthenticated):
        return ProxyError(401, f"P402: {msg}", "invalid_request_error", "invalid_api_key")
    if isinstance(exc, e.PermissionDenied):
        return ProxyError(403, f"P402: {msg}", "permission_denied", "permission_denied")
    if isinstance(exc, e.InvalidArgument):
        return ProxyError(400, f"P402: {msg}", "invalid_request_error", "invalid_argument",
                          param=getattr(exc, "field", None) or None)
    if isinstance(exc, e.ResourceExhausted):
        return ProxyError(429, f"P402: {msg}", "rate_limit_error", "p402_overloaded",
                          headers={"Retry-After": "1"})
    # Fail closed: without a decision, no spend.
    return ProxyError(503, f"P402 metering unavailable: {msg}", "server_error",
                      "p402_unavailable")


# ------------------------------------------------------------------ request reading


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, a part's text, parts in order
    (nested as deep as the body is: walked without recursion)."""
    out: list[str] = []
    todo = [content]
    while todo:
        c = todo.pop()
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            todo += reversed(c)
        elif isinstance(c, dict):
            if isinstance(c.get("text"), str):
                out.append(c["text"])
            elif "content" in c:
                todo.append(c["content"])
            elif isinstance(c.get("arguments"), str):  # tool calls carry JSON text
                out.append(c["arguments"])
            elif isinstance(c.get("output"), str):
                out.append(c["output"])
    return "".join(out)


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def prompt_bytes(kind: str, body: dict) -> int:
    """UTF-8 bytes of the prompt text of an OpenAI request (what Authorize prices).
    Parts of unexpected types count nothing (the upstream judges the request)."""
    if kind == "chat":
        return sum(len(_text_of(m.get("content")).encode()) +
                   sum(len(_text_of(t.get("function")).encode())
                       for t in _list(m.get("tool_calls")) if isinstance(t, dict))
                   for m in _list(body.get("messages")) if isinstance(m, dict))
    if kind == "responses":
        n = len(_text_of(body.get("instructions")).encode())
        inp = body.get("input")
        if isinstance(inp, str):
            return n + len(inp.encode())
        return n + sum(len(_text_of(item).encode()) for item in _list(inp))
    inp = body.get("input")
    items = inp if isinstance(inp, list) else [inp]
    total = 0
    for item in items:
        if isinstance(item, str):
            total += len(item.encode())
        elif isinstance(item, int):
            total += 4  # one token id
        elif isinstance(item, list):
            total += 4 * len(item)
    return total


def check_shape(kind: str, body: dict) -> None:
    """What OpenAI itself refuses with 400 before any work: the request's main
    field of the wrong JSON type."""
    field, ok = {"chat": ("messages", lambda v: isinstance(v, list)),
                 "responses": ("input", lambda v: v is None or isinstance(v, (str, list))),
                 "embeddings": ("input", lambda v: isinstance(v, (str, list)))}[kind]
    if not ok(body.get(field)):
        raise ProxyError(400, f"{field}: must be "
                         f"{'an array' if kind == 'chat' else 'a string or an array'}",
                         "invalid_request_error", "invalid_type", param=field)


def requested_cap(kind: str, body: dict) -> tuple[str, int]:
    """(the body field that carries the caller's output cap, its value), or
    ("", 0) when the caller set none."""
    names = {"chat": ("max_completion_tokens", "max_tokens"),
             "responses": ("max_output_tokens",)}.get(kind, ())
    for name in names:
        v = body.get(name)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProxyError(400, f"{name} must be a positive integer",
                                 "invalid_request_error", "invalid_value", param=name)
            return name, v
    return "", 0


# OpenAI's reasoning families refuse `max_tokens` on chat completions: they take
# `max_completion_tokens` (which counts reasoning tokens too). Matched on the name
# without its provider prefix: o1, o3-mini, o4-mini-2025-04-16, gpt-5, gpt-5.1-mini,
# codex-mini-latest.
_COMPLETION_TOKENS_ONLY = re.compile(r"^(?:o\d+|gpt-5|codex-mini)(?:[-.:_@].*)?$")


def takes_max_completion_tokens(model: str) -> bool:
    """True for a model family that rejects `max_tokens` on chat completions."""
    return bool(_COMPLETION_TOKENS_ONLY.match(model.rsplit("/", 1)[-1].lower()))


def cap_edits(kind: str, model: str, body: dict, cap_field: str, cap: int,
              granted: int, must_cap: bool) -> dict[str, Any]:
    """The body fields to change so the call cannot spend past its reservation.

    - The caller's cap is lowered to the granted one when it is larger, in the
      parameter the caller used.
    - A caller without a cap gets one only when `must_cap` (a HARD budget is in
      scope, clamped grants included): otherwise the call is forwarded uncapped
      and the Record settles what it actually cost (any excess over the estimate
      is the event's overrun), so a reasoning model is never cut short at the
      default estimate for nothing.
    - Chat on a model that takes `max_completion_tokens`: the cap is sent there,
      and a caller's `max_tokens` is renamed to it (OpenAI rejects `max_tokens` for
      those models).
    Returns {} when the body goes upstream as received; a None value drops the
    field (`edited`)."""
    edits: dict[str, Any] = {}
    if kind not in ("chat", "responses"):
        return edits
    want = cap
    if granted > 0 and (cap > granted or (not cap and must_cap)):
        want = granted
    field = cap_field or ("max_output_tokens" if kind == "responses" else "max_tokens")
    if kind == "chat" and takes_max_completion_tokens(model):
        if "max_tokens" in body:
            edits["max_tokens"] = None  # dropped from the forwarded body
        field = "max_completion_tokens"
    if want and (want != cap or field != cap_field):
        edits[field] = want
    return edits


def owners_from_headers(headers) -> tuple[dict[str, str], dict[str, str]]:
    owners, labels = {}, {}
    for name, value in headers.items():
        low = name.lower()
        if low.startswith(LABEL_PREFIX):
            key = low[len(LABEL_PREFIX):]
            if not key:
                raise ProxyError(400, "a label header needs a key: x-p402-label-<key>",
                                 "invalid_request_error", "invalid_header", param=name)
            labels[key] = value
        elif low.startswith("x-p402-") and low[7:] in OWNER_HEADERS:
            owners[low[7:]] = value
    return owners, labels


def _int_header(headers, name: str) -> int:
    v = headers.get(name)
    if v is None or v == "":
        return 0
    if not _digits(v):
        raise ProxyError(400, f"{name} must be a non-negative integer",
                         "invalid_request_error", "invalid_header", param=name)
    return int(v)


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²" and "٣", which int() refuses or
    reads as a number nobody wrote."""
    return text.isascii() and text.isdigit()


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class StreamUsage:
    """What an OpenAI SSE answer (chat or responses) says as it passes: its usage (the
    chat usage chunk, the responses `response.completed` / `.incomplete` / `.failed`
    event), whether it failed, and the content streamed so far."""

    __slots__ = ("kind", "usage", "failed", "chunks", "out_bytes", "shape")

    def __init__(self, kind: str):
        self.kind = kind
        self.usage: dict | None = None
        self.failed = False
        self.chunks = self.out_bytes = 0
        # The layout of the stream's content chunks (`p402core.chat_events`).
        self.shape = ChatShape() if kind == "chat" else None

    def observe_data(self, data: str | bytes | None) -> dict | None:
        """One event's data; returns its JSON object (None: none, or "[DONE]"), whose
        parts other than the usage read here may hold integral floats where the text
        has integers beyond 64 bits (`jsonio.loads_lax`)."""
        if data is None or data in ("[DONE]", b"[DONE]"):
            return None
        try:
            payload = jsonio.loads_lax(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(payload, dict):
            return None
        if self.kind == "chat":
            if payload.get("usage"):
                if not jsonio.exact(payload["usage"]):
                    payload = json.loads(data)
                self.usage = usage_from("chat", payload["usage"], payload.get("service_tier"))
            chunks, out_bytes = chat_content(payload)
            self.chunks += chunks
            self.out_bytes += out_bytes
        else:
            t = payload.get("type", "")
            if t == "response.output_text.delta":
                self.chunks += 1
                text = payload.get("delta")
                self.out_bytes += utf8_length(text) if type(text) is str else 0
            elif t in ("response.completed", "response.incomplete", "response.failed"):
                done = payload.get("response") or {}
                if isinstance(done, dict) and not jsonio.exact(done.get("usage")):
                    payload = json.loads(data)
                    done = payload.get("response") or {}
                self.usage = usage_from(self.kind, done.get("usage"),
                                        done.get("service_tier"), web_searches(done))
                self.failed = t == "response.failed"
        return payload

    def estimate(self, auth: Any) -> dict[str, int]:
        """The usage of a stream that ended without one: the estimate's input, one
        output token per content chunk (OpenAI streams about one per chunk), never
        fewer than ceil(bytes / 4): what the caller received is never under-counted."""
        return {"input_tokens": auth.estimated_input_tokens,
                "output_tokens": max(self.chunks, -(-self.out_bytes // 4))}


# The parts of a request body whose numbers the proxy never reads (only their text
# and shape): a large prompt is most of a body, and looking through it for integers
# beyond 64 bits (`jsonio.exact`) cost 31 µs of an 88 KB chat body's 75 µs parse. It
# is looked through only when the body is written again (`exact_body`).
_TEXT_PARTS = {"chat": frozenset({"messages", "tools"}),
               "responses": frozenset({"input", "tools"})}


def json_object(raw: bytes, kind: str = "") -> dict:
    """A request body that must be a JSON object (400 otherwise). With `kind`, the
    numbers of its text parts (`_TEXT_PARTS`) may be floats where the text has
    integers beyond 64 bits: read them only through `exact_body`."""
    try:
        parts = _TEXT_PARTS.get(kind)
        if parts is None:
            body = jsonio.loads(raw)
        else:
            body = jsonio.loads_lax(raw)
            if isinstance(body, dict) and not all(
                    jsonio.exact(v) for k, v in body.items() if k not in parts):
                body = jsonio.loads(raw)
    except ValueError:
        raise ProxyError(400, "the request body is not JSON", "invalid_request_error",
                         "invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise ProxyError(400, "the request body must be a JSON object",
                         "invalid_request_error", "invalid_json")
    return body


def exact_body(raw: bytes, body: dict) -> dict:
    """`body` (from `json_object(raw, kind)`) with every number as the text has it:
    itself, or the exact parse when a text part held an integer beyond 64 bits."""
    return body if jsonio.exact(body) else json_object(raw)


def _too_deep() -> ProxyError:
    return ProxyError(400, "the request body's JSON is nested too deeply",
                      "invalid_request_error", "invalid_json")


def parse_form(content_type: str, raw: bytes) -> tuple[dict[str, str], dict[str, int]]:
    """A multipart/form-data body -> ({field: text}, {file field: size in bytes})."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + raw)
    if not msg.is_multipart():
        raise ProxyError(400, "the multipart body could not be read", "invalid_request_error",
                         "invalid_body")
    fields: dict[str, str] = {}
    files: dict[str, int] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = files.get(name, 0) + len(payload)
        else:
            fields[name] = payload.decode("utf-8", "replace")
    return fields, files


@dataclass(frozen=True)
class MediaPlan:
    """What an image, transcription or speech call is authorized on."""

    model: str               # the price entry ("hd/1024-x-1792/dall-e-3" for images)
    input_bytes: int         # the text prompt's bytes
    max_output_tokens: int   # the output tokens it may make (0: the default estimate)
    expected: dict           # the quantities it is priced by (expected_usage)


def _count(fields: dict, name: str, default: int, hi: int) -> int:
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str) and _digits(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise ProxyError(400, f"{name} must be an integer within 1..{hi}",
                         "invalid_request_error", "invalid_value", param=name)
    return value


def media_plan(kind: str, model: str, fields: dict, files: dict, headers) -> MediaPlan:
    """The reservation of a media call:
    - images: n images (default 1) of the entry for the size and quality asked
      (`p402core._units.image_name`), plus up to IMAGE_TOKENS_MAX output tokens each
      for token-priced image models;
    - transcription / translation: the audio's milliseconds, declared in
      `x-p402-audio-ms` or else taken at 16 kbit/s of the uploaded file (an upper
      bound for compressed speech), plus up to 10 text tokens per second;
    - speech: the characters of `input`."""
    if kind == "images":
        n = _count(fields, "n", 1, MAX_IMAGES)
        prompt = fields.get("prompt")
        return MediaPlan(image_name(model, fields.get("size"), fields.get("quality")),
                         len(prompt.encode()) if isinstance(prompt, str) else 0,
                         n * IMAGE_TOKENS_MAX, {"images": n})
    if kind == "transcription":
        if "file" not in files:
            raise ProxyError(400, "file is required (multipart/form-data)",
                             "invalid_request_error", "missing_file", param="file")
        declared = _int_header(headers, AUDIO_MS_HEADER)
        ms = declared or max(1000, files["file"] // AUDIO_BYTES_PER_MS)
        return MediaPlan(model, 0, max(16, ms // 100), {"audio_ms": ms})
    text = fields.get("input")
    if not isinstance(text, str) or not text:
        raise ProxyError(400, "input is required", "invalid_request_error",
                         "missing_input", param="input")
    return MediaPlan(model, len(text.encode()), 0, {"characters": len(text)})


def media_usage(kind: str, raw: bytes, content_type: str) -> dict[str, Any] | None:
    """The usage a media answer reports (None: none; the reservation's estimate is
    recorded): images generated (and token usage of gpt-image models), the
    transcription's duration or token usage (JSON, verbose JSON or the final SSE
    event of a stream). Speech answers are audio and report nothing."""
    if kind == "speech":
        return None
    if content_type.startswith("text/event-stream"):
        answer = None
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                try:
                    event = jsonio.loads(line[5:].strip())
                except (ValueError, RecursionError):
                    continue
                if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                    answer = event
        if answer is None:
            return None
    elif "json" in content_type:
        answer = jsonio.loads(raw)
        if not isinstance(answer, dict):
            return None
    else:
        return None  # a plain-text transcript: no usage
    usage = answer.get("usage")
    if kind == "images":
        out = usage_from("images", usage) or {}
        data = answer.get("data")
        if isinstance(data, list) and data:
            out["images"] = len(data)
        return out or None
    if isinstance(usage, dict) and usage.get("type") == "duration":
        seconds = usage.get("seconds")
    elif isinstance(usage, dict) and usage.get("type") == "tokens":
        details = usage.get("input_token_details") or {}
        out = usage_from("transcription", {"input_tokens": usage.get("input_tokens"),
                                           "output_tokens": usage.get("output_tokens"),
                                           "input_tokens_details": {
                                               "audio_tokens": details.get("audio_tokens")}})
        return out
    else:
        seconds = answer.get("duration")
    if seconds is None:
        return None
    if (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            and 0 <= seconds <= MAX_TOKENS / 1000):
        return {"audio_ms": int(round(seconds * 1000))}
    # Not a duration a Record can carry (a string, negative, infinite, beyond
    # MAX_TOKENS ms): not read, as an unreadable token count; the estimate stands in.
    log.warning("the upstream's audio duration is %.60r, not a number of seconds: it "
                "is not read", seconds)
    return None


# A usage's totals, in either of OpenAI's shapes (its details are parts of them).
_TOTALS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


def usage_from(kind: str, usage: Any, service_tier: Any = None,
               searches: int = 0) -> dict[str, Any] | None:
    """OpenAI usage (chat, responses or images shape) -> P402 Record keywords: every
    detail OpenAI reports (cached, audio, image and reasoning tokens, the service
    tier billed; p402_client.openai.usage_from_openai) and the web-search tool calls
    made. None when there is no usage, or when one of its totals is not a token count
    (an int from 0 to MAX_TOKENS; logged): an upstream's unreadable report is not
    taken for zero tokens, the estimate stands in (evidence ESTIMATED)."""
    if not isinstance(usage, dict):
        return None
    for name in _TOTALS:
        n = usage.get(name)
        if n is not None and (type(n) is not int or not 0 <= n <= MAX_TOKENS):
            log.warning("the upstream's usage has %s = %.60r, not a token count: it is "
                        "not read", name, n)
            return None
    kw = usage_from_openai(usage, service_tier)
    if kw is None:
        return None
    if searches:
        kw["web_search_calls"] = searches
    if kind == "images" and kw["output_tokens"]:
        # the Images API's output tokens are all image tokens (gpt-image-1)
        kw["image_output_tokens"] = kw["output_tokens"]
    return kw


def answer_usage(kind: str, raw: bytes) -> dict[str, Any] | None:
    """`usage_from` of a whole JSON answer. Only its usage's numbers are read, so only
    they must be exact (the rest may hold floats for integers beyond 64 bits). Raises
    ValueError, AttributeError (not an object), UnicodeError or RecursionError."""
    answer = jsonio.loads_lax(raw)
    if not jsonio.exact(answer.get("usage")):
        answer = jsonio.loads(raw)
    return usage_from(kind, answer.get("usage"), answer.get("service_tier"),
                      web_searches(answer))


def web_searches(response: Any) -> int:
    """The web-search tool calls in a Responses API answer (its `web_search_call`
    output items); 0 for anything else."""
    output = response.get("output") if isinstance(response, dict) else None
    if not isinstance(output, list):
        return 0
    return sum(1 for item in output
               if isinstance(item, dict) and item.get("type") == "web_search_call")


def edited(body: dict, edits: dict[str, Any]) -> dict:
    """`body` with `edits` applied: a None value removes the field."""
    out = {**body, **edits}
    for k, v in edits.items():
        if v is None:
            del out[k]
    return out


def _must_cap(auth: Any) -> bool:
    """An uncapped call must be capped at its grant when a HARD budget is in scope
    (its promise is the reservation; a clamped grant only happens under one)."""
    return any(getattr(b.enforcement, "name", "") == "HARD"
               for b in (getattr(auth, "budgets", ()) or ()))


def _denying_budget(auth: Any) -> str:
    """The budget that refused the call: a HARD one the estimate does not fit
    (the tightest), else the first one reported."""
    statuses = list(getattr(auth, "budgets", ()) or ())
    short = [b for b in statuses if getattr(b.enforcement, "name", "") == "HARD"
             and b.remaining_nanos < auth.estimated_cost_nanos]
    pick = min(short, key=lambda b: b.remaining_nanos) if short else (
        statuses[0] if statuses else None)
    return pick.budget_id if pick is not None else ""


def denial(auth: Any) -> ProxyError:
    """The HTTP answer to a DENY decision: 402 for a budget (naming it), 429 for a
    rate limit, 404 for a model P402 has no price for, 403 for any other policy."""
    reasons = tuple(auth.reasons)
    extra = {"decision": "DENY", "reasons": list(reasons), "rule_ids": list(auth.rule_ids),
             "estimated_cost_nanos": auth.estimated_cost_nanos}
    text = ", ".join(reasons) or "denied"
    budget = [r for r in reasons if r.startswith("budget.")]
    if budget:
        budget_id = _denying_budget(auth)
        extra["budget_id"] = budget_id
        named = f" {budget_id!r}" if budget_id else ""
        return ProxyError(402, f"P402 budget{named} denied this call ({text})",
                          "insufficient_quota", budget[0], extra=extra)
    if reasons and reasons[0] == "price.unknown_model":
        return ProxyError(404, f"the model {auth.model!r} does not exist or has no price "
                          f"in P402's catalog ({text})", "invalid_request_error",
                          "model_not_found", param="model", extra=extra)
    if "policy.rate_limited" in reasons:
        headers = {}
        ms = getattr(auth, "retry_after_ms", 0) or 0
        if ms >= 0:  # -1: the call can never fit the limit: no point in retrying
            headers["Retry-After"] = str(max(1, math.ceil(ms / 1000)))
        extra["retry_after_ms"] = ms
        return ProxyError(429, f"P402 rate limit ({text})", "rate_limit_error",
                          "policy.rate_limited", headers=headers, extra=extra)
    return ProxyError(403, f"P402 policy denied this call ({text})", "permission_denied",
                      reasons[0] if reasons else "policy.denied", extra=extra)


# ------------------------------------------------------------------ the proxy


class _Call:
    """One authorized call, as its Records need it: the caller's key, the
    authorization, the prompt's bytes, the x-p402-* answer headers, and `names`, the
    Record's model, provider, owners and labels (those Authorize was asked with)."""

    __slots__ = ("key", "auth", "nbytes", "meta", "names")

    def __init__(self, key: str, auth: Any, nbytes: int, meta: dict[str, str],
                 names: dict[str, Any]):
        self.key = key
        self.auth = auth
        self.nbytes = nbytes
        self.meta = meta
        self.names = names


class Proxy:
    """The aiohttp application's handlers and the upstream session."""

    def __init__(self, config: ProxyConfig, meter: ClientMeter):
        self.config = config
        self.meter = meter
        self._session: aiohttp.ClientSession | None = None

    async def on_startup(self, _app: web.Application) -> None:
        # One timeout for every upstream call, the connect bound included (a request's
        # own ClientTimeout would replace this one whole, its connect bound with it).
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.upstream_timeout,
                                          connect=self.config.connect_timeout),
            auto_decompress=True)

    async def on_cleanup(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        await self.meter.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app[PROXY_KEY] = self
        app.router.add_post("/v1/{endpoint:chat/completions|responses|embeddings}",
                            self.metered)
        app.router.add_post("/v1/{endpoint:images/generations|images/edits|"
                            "audio/transcriptions|audio/translations|audio/speech}",
                            self.metered)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.models)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app

    # --- helpers -------------------------------------------------------------

    @staticmethod
    def _caller_key(request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not key.startswith("p402_"):
            raise ProxyError(401, "this endpoint takes a P402 API key: "
                             "Authorization: Bearer p402_…", "invalid_request_error",
                             "invalid_api_key")
        return key

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: request.headers[k] for k in FORWARD_HEADERS if k in request.headers}
        headers["Content-Type"] = "application/json"
        if self.config.upstream_key:
            headers["Authorization"] = f"Bearer {self.config.upstream_key}"
        return headers

    @staticmethod
    def _pass_back(upstream: aiohttp.ClientResponse) -> dict[str, str]:
        return {k: upstream.headers[k] for k in PASS_BACK_HEADERS if k in upstream.headers}

    async def _record(self, call: "_Call", *, outcome: str, usage: dict | None,
                      estimated: bool = False) -> str | None:
        """Queue the call's Record -> its event id (None if it could not be queued).
        It commits behind the caller's answer (the module docstring)."""
        # usage None (an error before any usage) or `estimated` (the reservation's
        # estimate stands in): not a provider report, so evidence ESTIMATED.
        try:
            return await self.meter.recorder(call.key).record(
                call.auth.reservation_id, outcome=outcome, input_bytes=call.nbytes,
                usage_estimated=estimated or usage is None, **call.names, **(usage or {}))
        except Exception as exc:  # noqa: BLE001 - the caller's call is already served
            log.error("record of reservation %s not queued (%s); its hold will expire "
                      "and be committed at its estimate", call.auth.reservation_id, exc)
            return None

    # --- handlers ------------------------------------------------------------

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return ProxyError(404, f"{request.method} {request.path} is not served by the P402 "
                          "proxy (metered: /v1/chat/completions, /v1/responses, "
                          "/v1/embeddings, /v1/images/generations, /v1/images/edits, "
                          "/v1/audio/transcriptions, /v1/audio/translations, "
                          "/v1/audio/speech; /v1/models)", "invalid_request_error",
                          "unknown_url").response()

    async def models(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self._caller_key(request)
            try:
                await self.meter.check_key(key)
            except Exception as exc:  # noqa: BLE001 - mapped to an HTTP answer
                raise _p402_error(exc) from None
            url = self.config.upstream_base + request.path[len("/v1"):]
            try:
                async with self._session.get(url, headers=self._upstream_headers(request)
                                             ) as up:
                    body = await up.read()
                    return web.Response(body=body, status=up.status,
                                        content_type=up.content_type,
                                        headers=self._pass_back(up))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ProxyError(502, f"upstream unreachable: {exc!r}", "server_error",
                                 "upstream_unreachable") from None
        except ProxyError as err:
            return err.response()

    async def metered(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._metered(request)
        except ProxyError as err:
            return err.response()
        except web.HTTPRequestEntityTooLarge:
            return ProxyError(413, f"the request body is larger than {MAX_BODY_BYTES} "
                              "bytes", "invalid_request_error", "request_too_large"
                              ).response()
        except UnicodeError:
            # json.loads accepts a lone "\ud800" escape; nothing downstream can encode it.
            return ProxyError(400, "the request body holds a lone UTF-16 surrogate "
                              "escape (\\ud800-\\udfff without its pair)",
                              "invalid_request_error", "invalid_json").response()
        except RecursionError:
            # Read (orjson takes 1,024 levels) but too deep to write again when the
            # body must change.
            return _too_deep().response()

    async def _metered(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        if endpoint in MEDIA:
            return await self._media(request, endpoint, MEDIA[endpoint])
        kind = METERED[endpoint]
        key = self._caller_key(request)
        raw = await request.read()
        body = json_object(raw, kind)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ProxyError(400, "model is required", "invalid_request_error",
                             "missing_model", param="model")
        check_shape(kind, body)
        owners, labels = owners_from_headers(request.headers)
        attempt = _int_header(request.headers, "x-p402-attempt")
        retry_of = request.headers.get("x-p402-retry-of", "")
        cap_field, cap = requested_cap(kind, body)
        nbytes = prompt_bytes(kind, body)
        call = await self._authorize(
            key, model, owners=owners, labels=labels or None, input_bytes=nbytes,
            max_output_tokens=cap, attempt=attempt, retry_of=retry_of)
        auth = call.auth

        # What the upstream must see differently: the granted cap, and usage on a
        # chat stream. A body that needs neither is forwarded as received.
        edits = cap_edits(kind, model, body, cap_field, cap, auth.output_token_cap,
                          _must_cap(auth))
        stream = bool(body.get("stream")) and kind != "embeddings"
        caller_wants_usage = True
        if stream and kind == "chat":
            so = body.get("stream_options")
            caller_wants_usage = bool(isinstance(so, dict) and so.get("include_usage"))
            if not caller_wants_usage:
                edits["stream_options"] = {**(so if isinstance(so, dict) else {}),
                                           "include_usage": True}
        data = jsonio.dumps(edited(exact_body(raw, body), edits)) if edits else raw

        up = await self._post(call, request.match_info["endpoint"], data,
                              self._upstream_headers(request))
        try:
            if up.status >= 400 or not stream:
                return await self._whole(request, up, kind, call)
            return await self._stream(request, up, kind, call, caller_wants_usage)
        finally:
            up.release()

    async def _whole(self, request, up, kind, call, read_usage=None, fallback=None):
        """A non-streamed answer (or any upstream error): read, record, answer.
        `read_usage(raw, content_type)` reads the usage of a media answer, `fallback`
        is recorded (as an estimate) when the answer has none."""
        auth = call.auth
        try:
            raw = await up.read()
        except asyncio.TimeoutError:
            await self._record(call, outcome="TIMEOUT", usage=None)
            raise ProxyError(504, "the upstream did not answer in time", "server_error",
                             "upstream_timeout") from None
        except aiohttp.ClientError as exc:
            await self._record(call, outcome="PROVIDER_ERROR", usage=None)
            raise ProxyError(502, f"upstream failed mid-answer: {exc}", "server_error",
                             "upstream_unreachable") from None
        headers = {**self._pass_back(up), **call.meta}
        if up.status >= 400:
            # The provider refused or failed: nothing was generated; pass it through.
            await self._record(call, outcome="PROVIDER_ERROR", usage=None)
            return web.Response(body=raw, status=up.status, headers=headers,
                                content_type=up.content_type or "application/json")
        try:
            if read_usage is not None:
                usage = read_usage(raw, up.content_type or "")
            else:
                usage = answer_usage(kind, raw)
        except (ValueError, AttributeError, UnicodeError, RecursionError):
            usage = None
        estimated = usage is None
        if usage is None:
            if kind != "speech":  # speech answers are audio: never any usage
                log.warning("upstream answer to %s had no usage; recording the estimate",
                            auth.reservation_id)
            usage = fallback or {"input_tokens": auth.estimated_input_tokens,
                                 "output_tokens": 0 if kind == "embeddings"
                                 else auth.estimated_output_tokens}
        event_id = await self._record(call, outcome="SUCCESS", usage=usage,
                                      estimated=estimated)
        if event_id is not None:
            headers["x-p402-event-id"] = event_id
        return web.Response(body=raw, status=up.status, headers=headers,
                            content_type=up.content_type or "application/json")

    async def _stream(self, request, up, kind, call, wants_usage):
        """Relay SSE; read usage from the final chunk/event; record at the end."""
        auth, rid = call.auth, call.auth.reservation_id
        resp = web.StreamResponse(status=up.status, headers={
            **self._pass_back(up), **call.meta, "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache"})
        seen = StreamUsage(kind)
        outcome = "SUCCESS"
        # Each upstream read is relayed at once, its complete events in one write;
        # an event goes on as received unless it must change (the usage the caller
        # did not ask for).
        events = SseEvents()
        strip = kind == "chat" and not wants_usage
        try:
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                out = relay_read(events, chunk, seen, strip)
                if seen.failed:
                    outcome = "PROVIDER_ERROR"
                if out:
                    await resp.write(out)
            out = _relay(events.close(), seen, strip)
            if seen.failed:
                outcome = "PROVIDER_ERROR"
            if out:
                await resp.write(out)
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The caller went away: charge what was streamed to it.
            if seen.usage is None:
                outcome = "CANCELLED"
        except asyncio.CancelledError:
            if seen.usage is None:
                outcome = "CANCELLED"
            await self._record(call, outcome=outcome,
                               usage=seen.usage or seen.estimate(auth),
                               estimated=seen.usage is None)
            raise
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            # The upstream broke mid-stream: tell the caller in-band (the status line
            # is long gone), the way OpenAI reports a streaming error.
            timed_out = isinstance(exc, asyncio.TimeoutError)
            outcome = "TIMEOUT" if timed_out else "PROVIDER_ERROR"
            log.warning("upstream stream for %s broke: %r", rid, exc)
            await _send_stream_error(resp, kind, "upstream_timeout" if timed_out
                                     else "upstream_stream_broken",
                                     "the upstream stream ended before its end")
        usage, estimated = seen.usage, seen.usage is None
        if usage is None:
            if outcome == "SUCCESS":
                log.warning("stream for %s ended without usage; recording the estimate", rid)
            usage = seen.estimate(auth)
        await self._record(call, outcome=outcome, usage=usage, estimated=estimated)
        return resp

    async def _authorize(self, key: str, model: str, *, owners: dict, labels: dict | None,
                         input_bytes: int, **kw: Any) -> "_Call":
        """Authorize with the caller's key -> the allowed call; a denial or a P402
        error as its HTTP answer."""
        try:
            auth = await self.meter.authorize(key, model, provider=self.config.provider,
                                              owners=owners, labels=labels,
                                              input_bytes=input_bytes, **kw)
        except ProxyError:
            raise
        except Exception as exc:  # noqa: BLE001 - P402 client errors -> HTTP
            raise _p402_error(exc) from None
        if not auth.allowed:
            raise denial(auth)
        meta = {"x-p402-reservation-id": auth.reservation_id,
                "x-p402-decision": auth.decision.name}
        if auth.reasons:
            meta["x-p402-reasons"] = ",".join(auth.reasons)
        return _Call(key, auth, input_bytes, meta,
                     self._names(auth, model, owners, labels))

    def _names(self, auth: Any, model: str, owners: dict, labels: dict | None
               ) -> dict[str, Any]:
        """What a Record says of its call besides the reservation. With `--target`,
        the call as Authorize was asked: should its hold be gone (made just before a
        crash of the server that held it), the call is still metered. In process
        the hold lives as long as the proxy that would send the Record, and naming
        the call would only cost the Record a slower path."""
        if self.meter.embedded is not None:
            return {}
        names: dict[str, Any] = {"model": auth.model or model}
        if owners:
            names["owners"] = owners
        if auth.provider:
            names["provider"] = auth.provider
        if labels:
            names["labels"] = labels
        return names

    async def _post(self, call: "_Call", endpoint: str, data: bytes, headers: dict
                    ) -> aiohttp.ClientResponse:
        """POST to the upstream; no answer in time or none at all is recorded
        (TIMEOUT / PROVIDER_ERROR) and answered 504 / 502."""
        try:
            return await self._session.post(
                self.config.upstream_base + "/" + endpoint, data=data, headers=headers)
        except asyncio.TimeoutError:
            await self._record(call, outcome="TIMEOUT", usage=None)
            raise ProxyError(504, "the upstream did not answer in time", "server_error",
                             "upstream_timeout") from None
        except aiohttp.ClientError as exc:
            await self._record(call, outcome="PROVIDER_ERROR", usage=None)
            raise ProxyError(502, f"upstream unreachable: {exc}", "server_error",
                             "upstream_unreachable") from None

    async def _media(self, request: web.Request, endpoint: str, kind: str
                     ) -> web.StreamResponse:
        """Images, transcriptions and speech: authorized with what they are priced by
        (`media_plan`: images, seconds of audio, characters), forwarded as received
        (JSON or multipart), recorded from the answer (`media_usage`)."""
        key = self._caller_key(request)
        raw = await request.read()
        ctype = request.headers.get("Content-Type", "")
        if ctype.lower().startswith("multipart/form-data"):
            fields, files = parse_form(ctype, raw)
        else:
            fields, files = json_object(raw), {}
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            raise ProxyError(400, "model is required", "invalid_request_error",
                             "missing_model", param="model")
        plan = media_plan(kind, model, fields, files, request.headers)
        owners, labels = owners_from_headers(request.headers)
        call = await self._authorize(
            key, plan.model, owners=owners, labels=labels or None,
            input_bytes=plan.input_bytes, max_output_tokens=plan.max_output_tokens,
            expected_usage=plan.expected,
            attempt=_int_header(request.headers, "x-p402-attempt"),
            retry_of=request.headers.get("x-p402-retry-of", ""))
        headers = self._upstream_headers(request)
        headers["Content-Type"] = ctype or "application/json"
        up = await self._post(call, endpoint, raw, headers)
        fallback = {"input_tokens": call.auth.estimated_input_tokens,
                    "output_tokens": call.auth.estimated_output_tokens, **plan.expected}
        try:
            return await self._whole(request, up, kind, call,
                                     read_usage=lambda body, ct: media_usage(kind, body, ct),
                                     fallback=fallback)
        finally:
            up.release()



class SseEvents:
    """The complete events of an SSE byte stream, as its chunks arrive.

    `feed(chunk)` returns the blocks completed by `chunk` (an event's lines, without
    the blank line that ends it); `close()` the last one when the stream ended
    without that blank line. Line ends are made "\n" (SSE allows "\r\n", "\r" and
    "\n"; a "\r" that ends a chunk waits for the next, which may start with "\n").
    """

    __slots__ = ("_buf", "_scan", "_cr")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # where the search for the next blank line resumes
        self._cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buf and not self._cr and b"\r" not in chunk:
            # Nothing carried over (a provider's every write is whole events): split
            # the chunk itself, without copying it through the buffer.
            blocks = chunk.split(b"\n\n")
            rest = blocks.pop()
            if rest:
                self._buf += rest
                self._kept()
            # Extra blank lines make empty or newline-led parts: nothing, or trimmed.
            return [b if b[:1] != b"\n" else b.lstrip(b"\n") for b in blocks
                    if b and b != b"\n"]
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        buf += chunk
        blocks = []
        start = 0
        end = buf.find(b"\n\n", self._scan)
        while end >= 0:
            block = bytes(buf[start:end]).lstrip(b"\n")  # extra blank lines: nothing
            if block:
                blocks.append(block)
            start = end + 2
            end = buf.find(b"\n\n", start)
        if start:
            del buf[:start]
        self._kept()
        return blocks

    def _kept(self) -> None:
        """After the buffer took what is left of an event: refuse an event that never
        ends, and resume the next search where a blank line can start."""
        n = len(self._buf)
        if n > MAX_EVENT_BYTES:
            raise aiohttp.ClientPayloadError(
                f"an SSE event of the upstream's stream is longer than {MAX_EVENT_BYTES} "
                "bytes")
        self._scan = max(n - 1, 0)

    def pending(self) -> bool:
        """Whether part of an event (or a line end) waits for the next chunk."""
        return bool(self._buf) or self._cr

    def close(self) -> list[bytes]:
        rest = bytes(self._buf).strip(b"\n")
        self._buf.clear()
        self._scan = 0
        return [rest] if rest else []


def _event_data(block: bytes) -> bytes | None:
    """An event block's data (its data lines joined with "\n"); None without any."""
    if block.startswith(b"data:") and b"\n" not in block:  # OpenAI's every event
        value = block[5:]
        return value[1:] if value.startswith(b" ") else value
    data = None
    for line in block.split(b"\n"):
        name, _, value = line.partition(b":")
        if name != b"data":
            continue  # another field, or a comment (":…")
        if value.startswith(b" "):
            value = value[1:]
        data = value if data is None else data + b"\n" + value
    return data


def _with_data(block: bytes, data: bytes) -> bytes:
    """`block` with its data lines replaced by one line of `data` (no newline in it)
    where the first one was; its other fields kept."""
    if b"\n" not in block:
        return b"data: " + data
    lines, placed = [], False
    for line in block.split(b"\n"):
        if line.partition(b":")[0] == b"data":
            if not placed:
                lines.append(b"data: " + data)
                placed = True
        else:
            lines.append(line)
    return b"\n".join(lines)


def without_null_usage(data: bytes, payload: dict) -> bytes:
    """The JSON text of a stream chunk whose top-level "usage" is null, without that
    member. OpenAI's chunks end with `,"usage":null}`: when "usage" appears once in
    the text and no \\u escape could spell it elsewhere (JSON strings cannot hold a
    bare quote), that ending is the top-level member and is cut off. Any other chunk
    is written again from its exact parse, without the member."""
    if null_usage_at_end(data) and b"\n" not in data:  # (one SSE data line)
        return data[:-len(NULL_USAGE_END)] + b"}"
    if not jsonio.exact(payload):
        payload = json.loads(data)
    return jsonio.dumps({k: v for k, v in payload.items() if k != "usage"})


def relay_read(events: SseEvents, chunk: bytes, seen: StreamUsage,
               strip_usage: bool) -> bytes:
    """`_relay(events.feed(chunk), seen, strip_usage)`: the bytes to send the caller
    for one read of the upstream's stream. The chat events at its start that are
    whole and one data line each, as a provider writes its chunks, are read by the
    compiled core (`p402core.chat_events`: the same result, about a hundred times a
    call; a content chunk laid out as the one before it is not even parsed); the
    rest, the general way."""
    if seen.kind == "chat" and not events.pending():
        out, end, chunks, out_bytes = chat_events(chunk, strip_usage, jsonio.loads_orjson,
                                                  seen.shape)
        seen.chunks += chunks
        seen.out_bytes += out_bytes
        if end == len(chunk):
            return out
        if end:  # the rest (the usage chunk, an event cut short...) the general way
            return out + _relay(events.feed(chunk[end:]), seen, strip_usage)
    return _relay(events.feed(chunk), seen, strip_usage)


def _relay(blocks: list[bytes], seen: StreamUsage, strip_usage: bool) -> bytes:
    """The bytes to send the caller for these event blocks, each observed by `seen`.
    `strip_usage`: the caller of a chat stream did not ask for usage (the proxy
    did, to meter it): the usage chunk is dropped and the `"usage": null` of every
    other chunk removed, so the caller gets what the upstream would have sent it."""
    out = []
    observe = seen.observe_data
    for block in blocks:
        data = _event_data(block)
        payload = observe(data)
        if strip_usage and payload is not None and "usage" in payload:
            if not payload.get("choices"):
                continue  # the usage chunk
            if payload["usage"] is None:
                block = _with_data(block, without_null_usage(data, payload))
        out.append(block)
    if not out:
        return b""
    out.append(b"")
    return b"\n\n".join(out)


async def _send_stream_error(resp: web.StreamResponse, kind: str, code: str,
                             message: str) -> None:
    err = {"message": message, "type": "server_error", "code": code, "param": None}
    event: dict[str, str] = {}
    payload: dict[str, Any] = {"error": err}
    if kind == "responses":
        event["event"] = "error"
        payload.update(type="error", code=code, message=message, param=None)
    event["data"] = json.dumps(payload, separators=(",", ":"))
    try:
        await resp.write(_sse_frame(event))
        await resp.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass  # the caller is gone too


def _sse_frame(event: dict[str, str]) -> bytes:
    lines = []
    for name, value in event.items():
        if name == "data":
            lines += [f"data: {v}" for v in value.split("\n")]
        else:
            lines.append(f"{name}: {value}")
    return ("\n".join(lines) + "\n\n").encode()


# ------------------------------------------------------------------ HTTP-level errors


def _http_error(exc: BaseException | None, status: int) -> tuple[int, str, str]:
    """(status, message, code) for a request aiohttp refused before any handler ran.
    The message never repeats the offending bytes (they may hold a key)."""
    from aiohttp import http_exceptions as h

    if isinstance(exc, h.LineTooLong):
        return 431, "a request line or header is too long", "header_too_large"
    if isinstance(exc, h.BadHttpMessage) and "Too many headers" in str(exc):
        return 431, "the request has too many headers", "too_many_headers"
    if isinstance(exc, h.InvalidHeader) or (
            isinstance(exc, h.BadHttpMessage) and "header" in str(exc).lower()):
        return 400, "a request header holds a character HTTP does not allow", \
            "invalid_header"
    if isinstance(exc, h.PayloadEncodingError):
        return 400, "the request body is not framed as its headers say", "invalid_body"
    if isinstance(exc, h.HttpProcessingError):
        return 400, "the request is not valid HTTP/1.1", "invalid_request"
    if status >= 500:
        return status, "the proxy failed to handle the request", "server_error"
    return status, "the request could not be handled", "invalid_request"


class _JsonErrorHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what it refuses itself (malformed
    HTTP, oversized or invalid headers) OpenAI-style in JSON, and logging it as one
    line that names the kind of fault, never the request's bytes or headers."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        status, text, code = _http_error(exc, status)
        if status >= 500 and exc is not None and not isinstance(
                exc, aiohttp.http_exceptions.HttpProcessingError):
            log.error("proxy: internal error (%s); answered %d", type(exc).__name__,
                      status, exc_info=exc)
        else:
            log.warning("proxy: refused a request from %s: %s (%s)", request.remote,
                        code, type(exc).__name__ if exc is not None else status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        resp = ProxyError(status, text, "server_error" if status >= 500
                          else "invalid_request_error", code).response()
        resp.force_close()
        return resp


# The proxy's AppRunner: its connections use `_JsonErrorHandler`.
ProxyRunner = runner_class(_JsonErrorHandler)


# ------------------------------------------------------------------ running it


async def start_proxy(config: ProxyConfig, target: str | None, listen: str, *,
                      p402_timeout: float = 5.0, embedded=None
                      ) -> tuple[web.AppRunner, int]:
    """Start the proxy on `listen` ("host:port", port 0 picks one) -> (runner, port),
    metering through the server at `target` or the in-process `embedded` runtime
    (an `inprocess.EmbeddedP402`, started by the caller). Stop it with `await
    runner.cleanup()`: queued Records are sent first."""
    meter = (ClientMeter(embedded=embedded, timeout=p402_timeout) if embedded is not None
             else ClientMeter(target, timeout=p402_timeout))
    proxy = Proxy(config, meter)
    runner = ProxyRunner(proxy.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port))
    try:
        await site.start()
    except OSError as exc:  # say why in words a user can act on, and close what opened
        await runner.cleanup()
        raise listen_error(listen, flag="--listen", env="P402_PROXY_LISTEN",
                           cause=exc) from None
    return runner, site._server.sockets[0].getsockname()[1]


async def serve_proxy(config: ProxyConfig, listen: str, *, target: str | None = None,
                      db: str | None = None, leases: bool = False, ready=None,
                      stop_event: asyncio.Event | None = None,
                      gc_tuning: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or `stop_event`). With `db`, P402's runtime and
    group-commit writer run in this process on that ledger and are called directly
    (`leases`: HARD budgets leased in slices, for several proxies or servers on one
    PostgreSQL ledger); else `target` is a running server. `ready(port)` is called
    once the proxy accepts calls. On stop, queued Records are sent before the
    runtime writes its open holds and stops."""
    import signal

    if busy(listen):  # say so before a ledger is opened and migrated for nothing
        raise listen_error(listen, flag="--listen", env="P402_PROXY_LISTEN")
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_event.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    store = embedded = None
    try:
        if db:
            from p402_server.gateways.inprocess import EmbeddedP402
            from p402_server.ledger import open_store
            from p402_server.runtime.config import ServerConfig

            settings = ServerConfig.from_env()  # the P402_* settings `p402 serve` reads
            store = await open_store(db)
            embedded = EmbeddedP402(store, config=settings, leases=leases)
            await embedded.start()
        elif not target:
            raise ValueError("target: a P402 server (--target) or a ledger (--db) is required")
        runner, port = await start_proxy(config, target, listen, embedded=embedded)
        if gc_tuning:  # `p402 proxy`'s own process (gc_policy.py), not a host app's
            tune_gc()
        try:
            log.info("p402 proxy on %s -> %s (P402 %s)", listen, config.upstream_base,
                     "in this process" if embedded is not None else f"at {target}")
            if ready is not None:
                ready(port)
            await stop_event.wait()
        finally:
            await runner.cleanup()
    finally:
        if embedded is not None:
            await embedded.stop()
        if store is not None:
            await store.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


def upstream_key_from_env(var: str) -> str:
    return os.environ.get(var, "")


__all__ = ["ProxyConfig", "Proxy", "ClientMeter", "PROXY_KEY", "start_proxy", "serve_proxy",
           "prompt_bytes", "usage_from", "denial", "owners_from_headers"]

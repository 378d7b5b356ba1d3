"""A deterministic OpenAI-compatible upstream for tests: aiohttp on 127.0.0.1, port 0.

Owns the stand-in's wire format and its usage rules, nothing else. It speaks enough
of OpenAI's HTTP API for the official `openai` package (and LiteLLM, and the P402
proxy) to talk to it as to the real thing:

- POST /v1/chat/completions — JSON, or SSE with `stream: true`: a role chunk, one
  chunk per output token, a finish chunk, then (only with
  `stream_options.include_usage`) a usage chunk with `choices: []`, then
  `data: [DONE]`.
- POST /v1/responses — JSON, or SSE events `response.created`,
  `response.in_progress`, `response.output_item.added`, `response.content_part.added`,
  `response.output_text.delta` (one per output token), `response.output_text.done`,
  `response.content_part.done`, `response.output_item.done`, `response.completed`
  (whose `response.usage` carries the usage).
- POST /v1/embeddings — float lists, or base64 float32 (the `openai` package asks
  for base64 by default).
- POST /v1/images/generations, /v1/images/edits (multipart), /v1/audio/transcriptions
  and /v1/audio/translations (multipart), /v1/audio/speech — see "images and audio"
  below for what they answer.
- GET /v1/models — the configured model ids.

Usage is a pure function of the request, so tests can assert exact numbers:
- prompt bytes = UTF-8 bytes of the prompt text (chat: every message's text content;
  responses: `instructions` + `input` text; embeddings: every input string, or 4 bytes
  per token id of a token-array input);
- input tokens = max(1, ceil(prompt bytes / 4));
- output tokens = min(the request's cap — `max_completion_tokens`, `max_tokens` or
  `max_output_tokens` — , `output_tokens`) (embeddings: 0);
- cached tokens = min(`cached_tokens`, input); reasoning = min(`reasoning_tokens`,
  output) (both included in the totals, as OpenAI reports them).
The text is "tok0 tok1 …", one word per output token (one SSE chunk each).
Chat with `max_tokens` on a reasoning model (o1, o3, o4, gpt-5 …) gets OpenAI's 400
`unsupported_parameter`.

Every request is kept in `requests` (`Received`: method, path, headers, parsed JSON
body, the bearer key used). Faults: `fail_next(status, times=…, retry_after=…)`
answers the next POST requests with an OpenAI-style error; `hang_next(seconds)`
delays the next answers (an upstream timeout, from the caller's side); `chunk_delay`
spaces SSE chunks (so a test can disconnect mid-stream); `cut_stream_after(n)`
drops the connection after n token chunks. A wrong key gets 401 when `api_key` is
set.

Use it in the test's own loop (`async with OpenAIStandin() as up:`) or, for sync
callers that would block that loop, on a thread of its own
(`with OpenAIStandin.in_thread() as up:`); both expose `base_url` (…/v1).
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CREATED = 1_700_000_000  # fixed timestamps: answers are byte-for-byte reproducible
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o", "text-embedding-3-small")
EMBEDDING_DIM = 8
IMAGE_TOKENS = 272  # output tokens per generated image (gpt-image-1, low quality, square)
# Models that refuse `max_tokens` on chat completions, as OpenAI's reasoning models do.
REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


@dataclass
class Received:
    """One request the stand-in got."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None
    api_key: str  # the bearer token of the Authorization header ("" if none)
    raw: bytes = b""  # the body's bytes as received


@dataclass
class _Fault:
    status: int = 0
    retry_after: float | None = None
    hang_seconds: float = 0.0
    message: str = ""


@dataclass
class Usage:
    """What the stand-in computes for one request (see the module docstring)."""

    prompt_bytes: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _text_of(content: Any) -> str:
    """The text of a message content: a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif "content" in part:
                    out.append(_text_of(part["content"]))
        return "".join(out)
    if isinstance(content, dict):
        return _text_of(content.get("content") or content.get("text"))
    return ""


def prompt_bytes(path: str, body: dict) -> int:
    """The prompt size the stand-in bills (module docstring)."""
    if path.endswith("/chat/completions"):
        return sum(len(_text_of(m.get("content")).encode()) for m in body.get("messages", ())
                   if isinstance(m, dict))
    if path.endswith("/responses"):
        n = len((body.get("instructions") or "").encode())
        inp = body.get("input", "")
        if isinstance(inp, str):
            return n + len(inp.encode())
        return n + sum(len(_text_of(item).encode()) for item in inp)
    if path.endswith("/embeddings"):
        inp = body.get("input", "")
        items = inp if isinstance(inp, list) else [inp]
        total = 0
        for item in items:
            if isinstance(item, str):
                total += len(item.encode())
            elif isinstance(item, int):
                total += 4
            elif isinstance(item, list):  # a token array
                total += 4 * len(item)
        return total
    return 0


def usage_for(path: str, body: dict, *, output_tokens: int = 20, cached_tokens: int = 0,
              reasoning_tokens: int = 0) -> Usage:
    """The usage the stand-in reports for `body` posted to `path` (module docstring).
    Tests call it to know the exact numbers to expect."""
    nbytes = prompt_bytes(path, body)
    inp = max(1, -(-nbytes // 4))
    if path.endswith("/embeddings"):
        return Usage(nbytes, inp, 0)
    cap = None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if isinstance(body.get(name), int):
            cap = body[name]
            break
    out = output_tokens if cap is None else max(0, min(cap, output_tokens))
    return Usage(nbytes, inp, out, min(cached_tokens, inp), min(reasoning_tokens, out))


def _words(n: int) -> list[str]:
    return [("tok%d" % i) if i == 0 else (" tok%d" % i) for i in range(n)]


def _error_body(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class OpenAIStandin:
    """The stand-in server (module docstring). Configure with attributes at any time."""

    def __init__(self, *, api_key: str | None = "sk-upstream-test", output_tokens: int = 20,
                 cached_tokens: int = 0, reasoning_tokens: int = 0, chunk_delay: float = 0.0,
                 models: tuple[str, ...] = DEFAULT_MODELS):
        self.api_key = api_key
        self.output_tokens = output_tokens
        self.cached_tokens = cached_tokens
        self.reasoning_tokens = reasoning_tokens
        # Chat only: audio tokens reported inside the totals (as gpt-audio does) and
        # the service tier the answer names (None: the field is left out).
        self.audio_input_tokens = 0
        self.audio_output_tokens = 0
        self.service_tier: str | None = None
        self.chunk_delay = chunk_delay
        # How SSE answers are framed on the wire: the line end ("\n", "\r\n" or
        # "\r", all valid SSE), and `sse_piece` > 0 writes the whole answer in pieces
        # of that many bytes, cut anywhere (inside an event, a line end, a UTF-8
        # character), as a network may deliver it (spaced by chunk_delay).
        self.sse_line_end = "\n"
        self.sse_piece = 0
        self.models = models
        self.requests: list[Received] = []
        self.disconnects = 0  # streams the caller dropped before the end
        self._faults: deque[_Fault] = deque()
        self._cut_after: int | None = None
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- control -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, status: int, *, times: int = 1, retry_after: float | None = None,
                  message: str = "") -> None:
        """Answer the next `times` POST requests with `status` and an OpenAI error body."""
        for _ in range(times):
            self._faults.append(_Fault(status=status, retry_after=retry_after,
                                       message=message))

    def hang_next(self, seconds: float, *, times: int = 1) -> None:
        """Delay the next `times` POST answers by `seconds` (then answer normally)."""
        for _ in range(times):
            self._faults.append(_Fault(hang_seconds=seconds))

    def cut_stream_after(self, chunks: int | None) -> None:
        """Drop the connection after `chunks` token chunks of the next streams."""
        self._cut_after = chunks

    def reset(self) -> None:
        self.requests.clear()
        self._faults.clear()
        self._cut_after = None
        self.disconnects = 0
        self.sse_line_end, self.sse_piece = "\n", 0

    def usage(self, path: str, body: dict) -> Usage:
        return usage_for(path, body, output_tokens=self.output_tokens,
                         cached_tokens=self.cached_tokens,
                         reasoning_tokens=self.reasoning_tokens)

    def last(self, path_suffix: str = "") -> Received:
        """The most recent request whose path ends with `path_suffix`."""
        for r in reversed(self.requests):
            if r.path.endswith(path_suffix):
                return r
        raise LookupError(f"no request to *{path_suffix} yet")

    # --- life cycle --------------------------------------------------------------

    async def start(self) -> "OpenAIStandin":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/images/generations", self._images)
        app.router.add_post("/v1/images/edits", self._images)
        app.router.add_post("/v1/audio/transcriptions", self._transcription)
        app.router.add_post("/v1/audio/translations", self._transcription)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a hanging answer stops when its caller goes away, so
        # stop() never waits on it.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "OpenAIStandin":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @classmethod
    def in_thread(cls, **kw: Any) -> "_ThreadedStandin":
        """The stand-in on its own thread and loop (for sync callers)."""
        return _ThreadedStandin(cls(**kw))

    # --- handlers ----------------------------------------------------------------

    async def _receive(self, request: web.Request) -> tuple[Any, web.StreamResponse | None]:
        """Record the request; answer auth failures and injected faults."""
        body, raw = None, b""
        if request.method == "POST" and request.content_type == "multipart/form-data":
            # form fields as strings; a file as {"filename", "size"}
            form = await request.post()
            body = {k: v if isinstance(v, str) else {"filename": v.filename,
                                                     "size": len(v.file.read())}
                    for k, v in form.items()}
        elif request.method == "POST":
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return None, web.json_response(
                    _error_body("body is not JSON", "invalid_request_error", None), status=400)
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else ""
        self.requests.append(Received(request.method, request.path,
                                      {k.lower(): v for k, v in request.headers.items()},
                                      body, key, raw))
        if self.api_key is not None and key != self.api_key:
            return body, web.json_response(
                _error_body("Incorrect API key provided.", "invalid_request_error",
                            "invalid_api_key"), status=401)
        if request.method == "POST" and self._faults:
            fault = self._faults.popleft()
            if fault.hang_seconds:
                await asyncio.sleep(fault.hang_seconds)
            if fault.status:
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                type_, code = {
                    429: ("rate_limit_error", "rate_limit_exceeded"),
                    400: ("invalid_request_error", None),
                }.get(fault.status, ("server_error", None))
                return body, web.json_response(
                    _error_body(fault.message or f"stand-in failure {fault.status}", type_,
                                code), status=fault.status, headers=headers)
        if request.method == "POST" and not isinstance(body, dict):
            return body, web.json_response(
                _error_body("body must be a JSON object", "invalid_request_error", None),
                status=400)
        if request.method == "POST" and not body.get("model"):
            return body, web.json_response(
                _error_body("you must provide a model parameter", "invalid_request_error",
                            None), status=400)
        return body, None

    def _next_id(self) -> int:
        self._counter += 1
        return self._counter

    async def _models(self, request: web.Request) -> web.StreamResponse:
        _body, early = await self._receive(request)
        if early is not None:
            return early
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "standin"}
            for m in self.models]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        model = str(body.get("model", ""))
        if "max_tokens" in body and model.startswith(REASONING_PREFIXES):
            # OpenAI's answer, word for word, to max_tokens on a reasoning model
            err = _error_body(
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.", "invalid_request_error",
                "unsupported_parameter")
            err["error"]["param"] = "max_tokens"
            return web.json_response(err, status=400)
        u = self.usage(request.path, body)
        n = self._next_id()
        cid, model = f"chatcmpl-standin-{n}", body["model"]
        finish = "length" if u.output_tokens < self.output_tokens else "stop"
        usage = {
            "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        }
        if self.audio_input_tokens or self.audio_output_tokens:
            usage["prompt_tokens_details"]["audio_tokens"] = min(
                self.audio_input_tokens, u.input_tokens - u.cached_tokens)
            usage["completion_tokens_details"]["audio_tokens"] = min(
                self.audio_output_tokens, u.output_tokens - u.reasoning_tokens)
        tier = {} if self.service_tier is None else {"service_tier": self.service_tier}
        words = _words(u.output_tokens)
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": CREATED, "model": model,
                **tier, "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                             "message": {"role": "assistant", "content": "".join(words),
                                         "refusal": None}}],
                "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            c = {"id": cid, "object": "chat.completion.chunk", "created": CREATED,
                 "model": model, "system_fingerprint": "fp_standin",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish_reason}]}
            if include_usage:
                c["usage"] = None
            return c

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": w}) for w in words]
        events.append(chunk({}, finish))
        if include_usage:
            events.append({"id": cid, "object": "chat.completion.chunk", "created": CREATED,
                           "model": model, **tier, "system_fingerprint": "fp_standin",
                           "choices": [], "usage": usage})
        return await self._sse(request, [(None, e) for e in events], token_offset=1)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        u = self.usage(request.path, body)
        n = self._next_id()
        rid, mid, model = f"resp_standin_{n}", f"msg_standin_{n}", body["model"]
        words = _words(u.output_tokens)
        text = "".join(words)
        usage = {
            "input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens,
        }

        def response(status: str, output: list, usage_: dict | None) -> dict:
            return {"id": rid, "object": "response", "created_at": CREATED, "status": status,
                    "model": model, "output": output, "usage": usage_, "error": None,
                    "incomplete_details": None, "instructions": body.get("instructions"),
                    "max_output_tokens": body.get("max_output_tokens"), "metadata": {},
                    "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0,
                    "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
                    "truncation": "disabled"}

        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                "content": [part]}
        final = response("completed", [item], usage)
        if not body.get("stream"):
            return web.json_response(final)
        seq = iter(range(10_000))

        def ev(type_: str, **fields: Any) -> tuple[str, dict]:
            return type_, {"type": type_, "sequence_number": next(seq), **fields}

        events = [
            ev("response.created", response=response("in_progress", [], None)),
            ev("response.in_progress", response=response("in_progress", [], None)),
            ev("response.output_item.added", output_index=0,
               item={**item, "status": "in_progress", "content": []}),
            ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
               part={"type": "output_text", "text": "", "annotations": []}),
        ]
        events += [ev("response.output_text.delta", item_id=mid, output_index=0,
                      content_index=0, delta=w, logprobs=[]) for w in words]
        events += [
            ev("response.output_text.done", item_id=mid, output_index=0, content_index=0,
               text=text, logprobs=[]),
            ev("response.content_part.done", item_id=mid, output_index=0, content_index=0,
               part=part),
            ev("response.output_item.done", output_index=0, item=item),
            ev("response.completed", response=final),
        ]
        return await self._sse(request, events, token_offset=4, done_marker=False)

    async def _sse(self, request: web.Request, events: list[tuple[str | None, dict]], *,
                   token_offset: int, done_marker: bool = True) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cut = self._cut_after
        pending = bytearray()  # what waits for a whole piece (sse_piece)
        try:
            for i, (name, data) in enumerate(events):
                if cut is not None and i - token_offset >= cut:
                    # An upstream that dies mid-stream: close without the end.
                    request.transport.close()
                    return resp
                frame = (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"
                await self._write_sse(resp, frame, pending)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if done_marker:
                await self._write_sse(resp, "data: [DONE]\n\n", pending)
            if pending:
                await resp.write(bytes(pending))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return resp

    async def _write_sse(self, resp: web.StreamResponse, frame: str,
                         pending: bytearray) -> None:
        raw = frame.replace("\n", self.sse_line_end).encode()
        if not self.sse_piece:
            await resp.write(raw)
            return
        pending += raw
        piece = self.sse_piece
        while len(pending) >= piece:
            await resp.write(bytes(pending[:piece]))
            del pending[:piece]
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        u = self.usage(request.path, body)
        inp = body.get("input", "")
        items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        data = []
        for i, item in enumerate(items):
            seed = len(json.dumps(item))
            vec = [((seed * (k + 3)) % 97) / 97.0 for k in range(EMBEDDING_DIM)]
            if body.get("encoding_format") == "base64":
                emb: Any = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vec)).decode()
            else:
                emb = vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": u.input_tokens,
                                            "total_tokens": u.input_tokens}})


    # --- images and audio ------------------------------------------------------
    # Images: one "data" item per image asked (n, default 1); gpt-image-* models
    # also report token usage: input = ceil(prompt bytes / 4) text tokens (+ 100
    # image tokens per input image of an edit), output = IMAGE_TOKENS per image.
    # Transcription: the audio lasts file bytes / 4 ms (32 kbit/s); whisper-1
    # reports {"type": "duration", "seconds"}, gpt-4o*-transcribe token usage
    # (audio input tokens = seconds x 10, output = the text's words); "text"
    # format answers plain text, without usage. Speech: binary audio, no usage.

    async def _images(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        n = int(body.get("n") or 1)
        model = str(body.get("model") or "dall-e-2")
        out: dict[str, Any] = {"created": CREATED, "data": [
            {"b64_json": base64.b64encode(b"img%d" % i).decode()} for i in range(n)]}
        if model.startswith("gpt-image"):
            text = -(-len(str(body.get("prompt", "")).encode()) // 4)
            images_in = 100 * sum(1 for v in body.values() if isinstance(v, dict))
            out["usage"] = {"input_tokens": text + images_in, "output_tokens": n * IMAGE_TOKENS,
                            "total_tokens": text + images_in + n * IMAGE_TOKENS,
                            "input_tokens_details": {"text_tokens": text,
                                                     "image_tokens": images_in}}
        return web.json_response(out)

    async def _transcription(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        size = (body.get("file") or {}).get("size", 0) if isinstance(body, dict) else 0
        seconds = size / 4000
        text = " ".join(["word"] * max(1, int(seconds)))
        fmt = body.get("response_format", "json")
        if fmt == "text":
            return web.Response(text=text, content_type="text/plain")
        out: dict[str, Any] = {"text": text}
        if str(body.get("model", "")).startswith("gpt-4o"):
            audio = int(seconds * 10)
            words = len(text.split())
            out["usage"] = {"type": "tokens", "input_tokens": audio, "output_tokens": words,
                            "total_tokens": audio + words,
                            "input_token_details": {"text_tokens": 0, "audio_tokens": audio}}
        else:
            out["usage"] = {"type": "duration", "seconds": seconds}
        if fmt == "verbose_json":
            out.update(task="transcribe", language="english", duration=seconds)
        return web.json_response(out)

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._receive(request)
        if early is not None:
            return early
        return web.Response(body=b"ID3" + bytes(len(str(body.get("input", "")))),
                            content_type="audio/mpeg")


@dataclass
class _ThreadedStandin:
    """An OpenAIStandin served from a private thread and event loop."""

    standin: OpenAIStandin
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:  # base_url, requests, fail_next, …
        return getattr(self.standin, name)

    def __enter__(self) -> "_ThreadedStandin":
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="openai-standin")
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.standin.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.standin.stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop.close()


__all__ = ["OpenAIStandin", "Received", "Usage", "usage_for", "prompt_bytes"]

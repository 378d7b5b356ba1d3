"""`wrap_openai()`: the official OpenAI SDK client, metered by P402.

This module owns metering `chat.completions.create` and `responses.create` of an
`openai.OpenAI` / `openai.AsyncOpenAI` client, streaming included. Everything else on
the client (embeddings, files, `with_raw_response`, …) passes through unmetered.

    from openai import OpenAI
    from p402_client import P402Client
    from p402_client.openai import wrap_openai

    p402 = P402Client("127.0.0.1:4020", api_key="p402_…")
    client = wrap_openai(OpenAI(), p402, owners={"feature": "support"})
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[...],
        p402={"owners": {"customer": "acme"}})   # per-call owners/labels/revenue

Per call, in order:
1. Owners and labels are the wrapper's, updated by the call's `p402={"owners": …,
   "labels": …, "revenue_nanos": …, "attempt": …, "retry_of": …}` (popped before the
   request goes to OpenAI).
2. The prompt is measured, not tokenized: the UTF-8 bytes of the text in `messages`
   (chat) or `instructions` + `input` (responses) — string contents, text parts, tool
   call arguments, names — plus the JSON of `tools`. Ids, roles, image URLs and
   inline file/audio data are not counted (they are not text tokens).
3. Authorize (a `p402_client.meter` meter) with the requested output cap
   (`max_completion_tokens` or `max_tokens` for chat, `max_output_tokens` for
   responses; 0 = the tenant's default). DENY raises `BudgetDenied` / `PolicyDenied`
   and OpenAI is never called.
4. The cap the decision allows is written back into the request: the parameter the
   caller used, else `max_completion_tokens` (chat) / `max_output_tokens`
   (responses). A streamed chat request gets `stream_options={"include_usage": True}`
   (merged into the caller's stream_options) so the final chunk carries the usage.
5. The call, then Record with the usage OpenAI reported (prompt/completion tokens,
   cached input, reasoning). A response without usage is recorded at the estimate
   (see `meter`, rule 5).

Streams: the returned stream is the SDK's, wrapped: iterate it as usual. The usage
comes from the final chunk (chat, `choices == []`) or the `response.completed`
event (responses), and the Record is sent when the stream ends. A stream that ends
without a usage report, breaks mid-way, or is closed early (`close()`, leaving
`with stream:`, or breaking out of a `for` loop over a sync stream) is recorded
with the estimate's input tokens and one output token per text delta received (what
OpenAI streams, one token per delta), outcome SUCCESS, PROVIDER_ERROR or CANCELLED.
An async stream abandoned without `aclose()` / `async with` is not settled by the
wrapper: its reservation expires and is committed at its estimate (never lost).

Retries are attributed: the wrapper does the retries the OpenAI client would have
done (the same `max_retries`, the same retryable errors — connection errors,
timeouts, 408, 409, 429, 5xx, and `x-should-retry` — and `Retry-After` /
`retry-after-ms` honoured) and turns the SDK's own retries off, so that every attempt
is its own Authorize and Record: attempt 0 first, then `attempt=n`,
`retry_of=<attempt 0's reservation id>`. A failed attempt is recorded with its
outcome (PROVIDER_ERROR, TIMEOUT) and the usage the `meter` rule gives it. A caller
that retries itself passes `p402={"attempt": n, "retry_of": rid}`.

Failure of P402 itself follows the meter's choice (fail-closed by default; see
`p402_client.meter`), and a `recorder=` sends Records in the background.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from typing import Any, Mapping

from .errors import InvalidArgument
from .meter import AsyncMeter, Meter, usage_kwargs

log = logging.getLogger("p402_client.openai")

CHAT = "chat"
RESPONSES = "responses"
P402_KWARG = "p402"
_P402_OPTIONS = frozenset({"owners", "labels", "revenue_nanos", "attempt", "retry_of",
                           "privacy_mode"})
# Keys whose string values are not prompt text (ids, roles, URLs, base64 payloads).
_NOT_TEXT = frozenset({"role", "type", "id", "call_id", "tool_call_id", "image_url", "url",
                       "file_data", "file_id", "detail", "format", "data", "status",
                       "audio", "input_audio", "image", "file"})
INITIAL_RETRY_DELAY = 0.5  # seconds; the openai SDK's own schedule
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0


# ---------------------------------------------------------------- pure helpers


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, Mapping):
        return sum(_text_bytes(v) for k, v in value.items() if k not in _NOT_TEXT)
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    if hasattr(value, "model_dump"):  # a pydantic message object from the SDK
        return _text_bytes(value.model_dump(exclude_none=True))
    return 0


def measure_input_bytes(kind: str, kwargs: Mapping[str, Any]) -> int:
    """The prompt's size in bytes (see the module docstring, step 2)."""
    if kind == CHAT:
        n = _text_bytes(kwargs.get("messages") or [])
    else:
        n = _text_bytes(kwargs.get("instructions") or "") + _text_bytes(
            kwargs.get("input") or "")
    tools = kwargs.get("tools")
    if tools:
        try:
            n += len(json.dumps(tools, separators=(",", ":"), default=str).encode())
        except (TypeError, ValueError):
            n += _text_bytes(tools)
    return n


def _cap_param(kind: str, kwargs: Mapping[str, Any]) -> tuple[str, int]:
    """(the parameter that carries the output cap, the cap asked for; 0 = none)."""
    names = (("max_completion_tokens", "max_tokens") if kind == CHAT
             else ("max_output_tokens",))
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return names[0], 0


def _get(obj: Any, name: str) -> Any:
    if type(obj) is dict:  # a parsed answer: spares the ABC check (typing.Mapping)
        return obj.get(name)
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else 0


def usage_from_openai(usage: Any, service_tier: Any = None) -> dict[str, Any] | None:
    """Record keywords from an OpenAI usage object (chat, responses or images shape),
    or None; `service_tier` is the response's own field ("default", "flex",
    "priority", …), kept when it is one P402 prices ("default" and "auto" are
    standard, anything else is left out).

    Every detail OpenAI reports is kept: cached, cache-write (OpenAI-compatible
    gateways report it), audio and image input tokens as parts of the input total;
    reasoning, audio and image output tokens as parts of the output total. A part
    larger than what is left of its total is cut to it (an upstream that counts a
    token twice is not billed twice)."""
    if usage is None:
        return None
    if _get(usage, "prompt_tokens") is not None or _get(usage, "completion_tokens") is not None:
        inp, out = _get(usage, "prompt_tokens"), _get(usage, "completion_tokens")
        in_details = _get(usage, "prompt_tokens_details")
        out_details = _get(usage, "completion_tokens_details")
    else:
        inp, out = _get(usage, "input_tokens"), _get(usage, "output_tokens")
        in_details = _get(usage, "input_tokens_details")
        out_details = _get(usage, "output_tokens_details")
    if inp is None and out is None:
        return None
    kw: dict[str, Any] = {"input_tokens": _int(inp), "output_tokens": _int(out)}
    _take_parts(kw, "input_tokens", in_details, _INPUT_PARTS)
    _take_parts(kw, "output_tokens", out_details, _OUTPUT_PARTS)
    if isinstance(service_tier, str) and service_tier in _TIERS:  # any odd value: unread
        kw["service_tier"] = service_tier
    return usage_kwargs(**kw)


def _take_parts(kw: dict, total: str, details: Any, parts: tuple) -> None:
    """The parts of `total` from OpenAI's details, each cut to what is left of it."""
    if details is None:
        return
    left = kw[total]
    for name, key in parts:
        n = min(_int(_get(details, key)), left)
        if n:
            kw[name] = n
            left -= n


# (Record keyword, OpenAI usage detail key), in the order each takes its share
_INPUT_PARTS = (("cached_input_tokens", "cached_tokens"),
                ("cache_write_tokens", "cache_write_tokens"),
                ("audio_input_tokens", "audio_tokens"),
                ("image_input_tokens", "image_tokens"))
_OUTPUT_PARTS = (("reasoning_tokens", "reasoning_tokens"),
                 ("audio_output_tokens", "audio_tokens"),
                 ("image_output_tokens", "image_tokens"))
_TIERS = frozenset(("batch", "flex", "priority"))


def _header(exc: Any, name: str) -> str | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        return headers.get(name)
    except Exception:  # noqa: BLE001
        return None


def is_retryable(exc: BaseException) -> bool:
    """Would the OpenAI SDK retry this error? (its own rules, mirrored)."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        should = _header(exc, "x-should-retry")
        if should == "true":
            return True
        if should == "false":
            return False
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def retry_delay(exc: BaseException, retry: int, initial: float = INITIAL_RETRY_DELAY
                ) -> float:
    """Seconds before retry number `retry` (0-based): the server's Retry-After /
    retry-after-ms when given (up to a minute), else exponential backoff with jitter."""
    ms = _header(exc, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if 0 < value <= MAX_RETRY_AFTER:
                return value
        except ValueError:
            pass
    ra = _header(exc, "retry-after")
    if ra is not None:
        try:
            value = float(ra)
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(ra) if ra else None
            value = (parsed.timestamp() - time.time()) if parsed else -1
        if 0 < value <= MAX_RETRY_AFTER:
            return value
    return min(initial * 2 ** retry, MAX_RETRY_DELAY) * (1 - 0.25 * random.random())


# ---------------------------------------------------------------- the call plan


class _Call:
    """One metered create(): its meter arguments and the request to send."""

    def __init__(self, wrapper: "_WrapperBase", kind: str, kwargs: dict[str, Any]):
        opts = kwargs.pop(P402_KWARG, None) or {}
        if not isinstance(opts, Mapping):
            raise InvalidArgument(P402_KWARG, "must be a mapping")
        unknown = sorted(set(opts) - _P402_OPTIONS)
        if unknown:
            raise InvalidArgument(f"{P402_KWARG}.{unknown[0]}",
                                  f"unknown option (one of {', '.join(sorted(_P402_OPTIONS))})")
        model = kwargs.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgument("model", "is required")
        self.kind = kind
        self.kwargs = kwargs
        self.model = model
        self.stream = bool(kwargs.get("stream"))
        if self.stream and kind == CHAT:
            so = dict(kwargs.get("stream_options") or {})
            so["include_usage"] = True
            kwargs["stream_options"] = so
        self.cap_name, requested = _cap_param(kind, kwargs)
        owners = {**wrapper.owners, **dict(opts.get("owners") or {})}
        labels = {**wrapper.labels, **dict(opts.get("labels") or {})}
        self.attempt = int(opts.get("attempt") or 0)
        self.retry_of = opts.get("retry_of") or ""
        self.meter_kw: dict[str, Any] = dict(
            provider=wrapper.provider, owners=owners or None, labels=labels or None,
            input_bytes=measure_input_bytes(kind, kwargs), max_output_tokens=requested,
            revenue_nanos=int(opts.get("revenue_nanos") or 0),
            privacy_mode=opts.get("privacy_mode", wrapper.privacy_mode),
            started=False, recorder=wrapper.recorder, fail_open=wrapper.fail_open)

    def meter_args(self) -> dict[str, Any]:
        return dict(self.meter_kw, attempt=self.attempt, retry_of=self.retry_of)

    def request(self, cap: int) -> dict[str, Any]:
        kw = dict(self.kwargs)
        if cap > 0:  # 0 only under fail-open with no cap asked: leave it to OpenAI
            kw[self.cap_name] = cap
        return kw

    def next_attempt(self, reservation_id: str) -> None:
        if not self.retry_of:
            self.retry_of = reservation_id
        self.attempt += 1


class _StreamState:
    """What a stream has shown so far: the reported usage, text deltas counted."""

    def __init__(self, kind: str, meter: Any):
        self.kind = kind
        self.meter = meter
        self.usage: dict[str, int] | None = None
        self.deltas = 0
        self.finished = False

    def observe(self, item: Any) -> None:
        if self.kind == CHAT:
            u = _get(item, "usage")
            if u is not None:
                self.usage = usage_from_openai(u, _get(item, "service_tier"))
            for choice in _get(item, "choices") or ():
                if _get(_get(choice, "delta"), "content"):
                    self.deltas += 1
        else:
            etype = _get(item, "type")
            if etype == "response.output_text.delta":
                self.deltas += 1
            elif etype in ("response.completed", "response.incomplete", "response.failed"):
                resp = _get(item, "response")
                u = usage_from_openai(_get(resp, "usage"), _get(resp, "service_tier"))
                if u is not None:
                    self.usage = u

    def settle_usage(self) -> None:
        """Give the meter the usage to record (reported, else estimated)."""
        if self.usage is not None:
            self.meter.set_usage(self.usage)
            return
        auth = self.meter.authorization
        log.warning("p402: %s stream ended without a usage report; recording the "
                    "estimated input and %d streamed output tokens", self.meter.model,
                    self.deltas)
        self.meter.set_usage(input_tokens=auth.estimated_input_tokens if auth else 0,
                             output_tokens=self.deltas, estimated=True)


# How a stream closed before its end is settled: as a cancellation (never raised).
_CANCEL = asyncio.CancelledError()


class MeteredStream:
    """A sync OpenAI stream that records its usage when it ends (or is closed)."""

    def __init__(self, stream: Any, state: _StreamState):
        self._stream = stream
        self._state = state

    @property
    def meter(self) -> Meter:
        return self._state.meter

    def _finish(self, exc: BaseException | None) -> None:
        st = self._state
        if st.finished:
            return
        st.finished = True
        st.settle_usage()
        st.meter.__exit__(None if exc is None else type(exc), exc, None)

    def __iter__(self) -> Any:
        try:
            while True:
                try:
                    item = next(self._stream)
                except StopIteration:
                    self._finish(None)
                    return
                self._state.observe(item)
                yield item
        except GeneratorExit:  # the consumer broke out of its for loop
            self.close()
            raise
        except BaseException as exc:
            self._finish(exc)
            raise

    def __next__(self) -> Any:
        try:
            item = next(self._stream)
        except StopIteration:
            self._finish(None)
            raise
        except BaseException as exc:
            self._finish(exc)
            raise
        self._state.observe(item)
        return item

    def close(self) -> None:
        """Stop reading: closes the HTTP response and records what was seen."""
        if not self._state.finished:
            try:
                self._stream.close()
            finally:
                self._finish(_CANCEL)

    def __enter__(self) -> "MeteredStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # response, _iterator, …
        return getattr(self._stream, name)


class AsyncMeteredStream:
    """An async OpenAI stream that records its usage when it ends (or is closed)."""

    def __init__(self, stream: Any, state: _StreamState):
        self._stream = stream
        self._state = state

    @property
    def meter(self) -> AsyncMeter:
        return self._state.meter

    async def _finish(self, exc: BaseException | None) -> None:
        st = self._state
        if st.finished:
            return
        st.finished = True
        st.settle_usage()
        await st.meter.__aexit__(None if exc is None else type(exc), exc, None)

    def __aiter__(self) -> "AsyncMeteredStream":
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._stream.__anext__()
        except StopAsyncIteration:
            await self._finish(None)
            raise
        except BaseException as exc:
            await self._finish(exc)
            raise
        self._state.observe(item)
        return item

    async def aclose(self) -> None:
        """Stop reading: closes the HTTP response and records what was seen."""
        if not self._state.finished:
            try:
                await self._stream.close()
            finally:
                await self._finish(_CANCEL)

    close = aclose

    async def __aenter__(self) -> "AsyncMeteredStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# ---------------------------------------------------------------- the wrappers


class _WrapperBase:
    def __init__(self, client: Any, p402: Any, *, owners: Any, labels: Any, provider: str,
                 recorder: Any, fail_open: bool | None, max_retries: int | None,
                 privacy_mode: Any, retry_initial_delay: float):
        self._client = client
        self.p402 = p402
        self.owners = dict(owners or {})
        self.labels = dict(labels or {})
        self.provider = provider
        self.recorder = recorder
        self.fail_open = fail_open
        self.privacy_mode = privacy_mode
        self.max_retries = client.max_retries if max_retries is None else max_retries
        self.retry_initial_delay = retry_initial_delay
        # The SDK's own retries are off: each attempt must be its own metered call.
        self._raw = client.with_options(max_retries=0)
        self.chat = _Namespace(client.chat, completions=_Namespace(
            client.chat.completions, create=self._chat_create))
        self.responses = _Namespace(client.responses, create=self._responses_create)

    @property
    def unwrapped(self) -> Any:
        """The OpenAI client as given (unmetered)."""
        return self._client

    def __getattr__(self, name: str) -> Any:  # everything else passes through
        return getattr(self._client, name)

    def _chat_create(self, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _responses_create(self, **kwargs: Any) -> Any:
        raise NotImplementedError


class _Namespace:
    """`wrapped.chat.completions.create`: the metered method; other attributes fall
    back to the SDK's resource."""

    def __init__(self, resource: Any, **attrs: Any):
        self._resource = resource
        self.__dict__.update(attrs)

    def __getattr__(self, name: str) -> Any:  # with_raw_response, parse, stream, …
        return getattr(self._resource, name)


def _raw_method(raw: Any, kind: str) -> Any:
    return raw.chat.completions.create if kind == CHAT else raw.responses.create


class MeteredOpenAI(_WrapperBase):
    """An `openai.OpenAI` whose chat.completions.create and responses.create are metered."""

    def _chat_create(self, **kwargs: Any) -> Any:
        return self._create(CHAT, kwargs)

    def _responses_create(self, **kwargs: Any) -> Any:
        return self._create(RESPONSES, kwargs)

    def _create(self, kind: str, kwargs: dict[str, Any]) -> Any:
        call = _Call(self, kind, kwargs)
        method = _raw_method(self._raw, kind)
        retry = 0
        while True:
            m = Meter(self.p402, call.model, **call.meter_args())
            m.__enter__()  # DENY raises here, before OpenAI is called
            try:
                m.start()
                result = method(**call.request(m.output_token_cap))
            except BaseException as exc:
                m.__exit__(type(exc), exc, exc.__traceback__)
                if retry < self.max_retries and is_retryable(exc):
                    delay = retry_delay(exc, retry, self.retry_initial_delay)
                    log.info("p402: %s attempt %d failed (%s); retrying in %.2fs",
                             call.model, call.attempt, type(exc).__name__, delay)
                    call.next_attempt(m.reservation_id)
                    retry += 1
                    time.sleep(delay)
                    continue
                raise
            if call.stream:
                return MeteredStream(result, _StreamState(kind, m))
            usage = usage_from_openai(_get(result, "usage"), _get(result, "service_tier"))
            if usage is not None:
                m.set_usage(usage)
            m.__exit__(None, None, None)
            return result


class AsyncMeteredOpenAI(_WrapperBase):
    """An `openai.AsyncOpenAI` whose chat.completions.create and responses.create are
    metered (awaitable)."""

    async def _chat_create(self, **kwargs: Any) -> Any:  # type: ignore[override]
        return await self._create(CHAT, kwargs)

    async def _responses_create(self, **kwargs: Any) -> Any:  # type: ignore[override]
        return await self._create(RESPONSES, kwargs)

    async def _create(self, kind: str, kwargs: dict[str, Any]) -> Any:
        call = _Call(self, kind, kwargs)
        method = _raw_method(self._raw, kind)
        retry = 0
        while True:
            m = AsyncMeter(self.p402, call.model, **call.meter_args())
            await m.__aenter__()
            try:
                m.start()
                result = await method(**call.request(m.output_token_cap))
            except BaseException as exc:
                await m.__aexit__(type(exc), exc, exc.__traceback__)
                if retry < self.max_retries and is_retryable(exc):
                    delay = retry_delay(exc, retry, self.retry_initial_delay)
                    log.info("p402: %s attempt %d failed (%s); retrying in %.2fs",
                             call.model, call.attempt, type(exc).__name__, delay)
                    call.next_attempt(m.reservation_id)
                    retry += 1
                    await asyncio.sleep(delay)
                    continue
                raise
            if call.stream:
                return AsyncMeteredStream(result, _StreamState(kind, m))
            usage = usage_from_openai(_get(result, "usage"), _get(result, "service_tier"))
            if usage is not None:
                m.set_usage(usage)
            await m.__aexit__(None, None, None)
            return result


def wrap_openai(openai_client: Any, p402: Any, *, owners: Any = None, labels: Any = None,
                provider: str = "openai", recorder: Any = None,
                fail_open: bool | None = None, max_retries: int | None = None,
                privacy_mode: Any = None,
                retry_initial_delay: float = INITIAL_RETRY_DELAY
                ) -> MeteredOpenAI | AsyncMeteredOpenAI:
    """`openai_client` with chat.completions.create and responses.create metered.

    `p402` is a P402Client for `openai.OpenAI`, an AsyncP402Client for
    `openai.AsyncOpenAI`. `owners` / `labels` apply to every call (a call's
    `p402={...}` adds to them). `max_retries` defaults to the OpenAI client's.
    """
    import openai

    from .client import AsyncP402Client, P402Client

    if isinstance(openai_client, openai.AsyncOpenAI):
        if not isinstance(p402, AsyncP402Client):
            raise InvalidArgument("p402", "an AsyncOpenAI client needs an AsyncP402Client")
        cls: type[_WrapperBase] = AsyncMeteredOpenAI
    elif isinstance(openai_client, openai.OpenAI):
        if not isinstance(p402, P402Client):
            raise InvalidArgument("p402", "an OpenAI client needs a P402Client")
        cls = MeteredOpenAI
    else:
        raise InvalidArgument("openai_client", f"must be openai.OpenAI or "
                                               f"openai.AsyncOpenAI, got "
                                               f"{type(openai_client).__name__}")
    if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
        raise InvalidArgument("max_retries", "must be an int >= 0")
    return cls(openai_client, p402, owners=owners, labels=labels, provider=provider,
               recorder=recorder, fail_open=fail_open, max_retries=max_retries,
               privacy_mode=privacy_mode, retry_initial_delay=retry_initial_delay)


__all__ = ["wrap_openai", "MeteredOpenAI", "AsyncMeteredOpenAI", "MeteredStream",
           "AsyncMeteredStream", "usage_from_openai", "measure_input_bytes",
           "is_retryable", "retry_delay"]

"""`meter()`: one metered AI call as a context manager (sync and async).

This module owns the two-phase discipline around one provider call, so a gateway
cannot forget half of it: Authorize on enter, then exactly one of Record or Release
on exit, with the outcome taken from how the block ended.

    with p402.meter("gpt-4o-mini", owners={"customer": "acme"},
                    input_bytes=len(prompt.encode()), max_output_tokens=512) as m:
        reply = provider.call(prompt, max_tokens=m.output_token_cap)
        m.set_usage(input_tokens=reply.usage.prompt_tokens,
                    output_tokens=reply.usage.completion_tokens)

    async with aclient.meter(...) as m: ...          # the same, on AsyncP402Client

Enter: Authorize. DENY raises `BudgetDenied` (a budget refused) or `PolicyDenied`
(a rule, a rate limit, an unpriced model), carrying `.authorization` and `.reasons`;
no reservation exists then, so nothing is left to settle. ALLOW and WARN enter the
block; `m.authorization` is the answer (a WARN's reasons are there, and logged at
INFO on `p402_client.meter`: a soft limit warns on every call past it, which is
data for the caller, not a log line per call at WARNING),
`m.output_token_cap` the output cap to send to the provider (it may be smaller than
asked for: a clamp).

Exit — the exact rule, first match wins:

1. `m.record(...)` or `m.release()` was called in the block: nothing more.
2. Usage was given (`m.set_usage(...)`): Record it, with outcome SUCCESS when the
   block returned, else the outcome mapped from the exception (below).
3. The call was never started: Release (the reservation is voided, cost 0). A
   meter starts "started" (conservative: the block is assumed to make the call);
   pass `started=False` and call `m.start()` right before the provider call to have
   an exception raised before it release instead of record.
4. The block raised after the call started, without usage: Record the mapped error
   outcome. Its usage is what the estimate supports (`error_usage="auto"`): for
   TIMEOUT and CANCELLED the estimate's input tokens (the prompt reached the
   provider and may be billed; "a cancelled call is charged its input cost"), for
   PROVIDER_ERROR none (a provider error is not billed). `error_usage="estimate"`
   charges the estimate's input tokens for every error, `"none"` never does. The
   event keeps the reservation's estimate (`estimated_cost_nanos`) beside it.
5. The block returned after the call started, without usage: Record SUCCESS at the
   full estimate (input and output tokens) and log a warning. The call happened
   and its usage is unknown, so the estimate is charged rather than nothing.

A Record of rule 4 or 5 (usage derived from the estimate, not reported by the
block) is sent with `usage_estimated=True`: its evidence is ESTIMATED, not
REPORTED. Usage given with `set_usage` / `record` is REPORTED, error or not.

Exception -> outcome: `asyncio.CancelledError`, `KeyboardInterrupt` and
`GeneratorExit` -> CANCELLED; `TimeoutError` or any exception class whose name
contains "Timeout" (openai.APITimeoutError, httpx.TimeoutException, litellm.Timeout)
-> TIMEOUT; anything else -> PROVIDER_ERROR. The exception always propagates: the
meter never swallows it.

Failure of P402 itself (see also `recorder`):
- fail-closed (default): an Authorize that cannot reach the service raises
  (`Unavailable`, `DeadlineExceeded`, `ResourceExhausted`) and the call is not made;
  a Record on exit that fails raises from `__exit__` (after the client's retries).
- fail-open (`fail_open=True`, or `P402Client(..., fail_open=True)`): an Authorize
  that cannot reach the service is logged as a warning and answered locally with
  ALLOW, reason `client.fail_open` (`m.fail_open` is True) and the output cap asked
  for; on exit the call is recorded as a meter-only event (model, provider, owners
  and labels sent along, since no reservation exists). A Record that fails is logged,
  not raised: the reservation then expires at its TTL and the server commits it at
  its estimate (outcome EXPIRED, evidence ESTIMATED), so spend is not lost.
  With a `recorder=`, Records are queued and retried in the background instead.

Bad input (an unknown owner dimension, a negative token count, …) always raises
`InvalidArgument` naming the field, in either mode: it is a bug, not an outage.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Mapping

from ._convert import UNIT_FIELDS
from .errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable, denial
from .types import (
    Authorization,
    Decision,
    Outcome,
    RecordResult,
    ReleaseResult,
    Usage,
)

if TYPE_CHECKING:  # pragma: no cover
    from .client import AsyncP402Client, P402Client
    from .recorder import AsyncRecorder, Recorder

log = logging.getLogger("p402_client.meter")

#: Reason of the local ALLOW answered when the service is unreachable (fail-open).
FAIL_OPEN_REASON = "client.fail_open"
#: Errors that mean "P402 cannot be reached", the only ones fail-open absorbs.
UNREACHABLE = (Unavailable, DeadlineExceeded, ResourceExhausted)
ERROR_USAGE_MODES = ("auto", "estimate", "none")
_TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_tokens",
                 "output_tokens", "reasoning_tokens")
_USAGE_FIELDS = (*_TOKEN_FIELDS, *UNIT_FIELDS)


def outcome_for_exception(exc: BaseException | None) -> Outcome:
    """The ledger outcome of a call that ended with `exc` (None: SUCCESS)."""
    if exc is None:
        return Outcome.SUCCESS
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit)):
        return Outcome.CANCELLED
    if isinstance(exc, TimeoutError):
        return Outcome.TIMEOUT
    # Duck-typed so no provider SDK has to be imported: openai.APITimeoutError,
    # httpx.TimeoutException, litellm.Timeout, requests' Timeout, …
    if any("Timeout" in cls.__name__ for cls in type(exc).__mro__):
        return Outcome.TIMEOUT
    return Outcome.PROVIDER_ERROR


def usage_kwargs(usage: Any = None, **kw: int) -> dict[str, int]:
    """Usage as Record keywords, from a `Usage`, a mapping, or keyword ints (the
    Usage field names; `service_tier` a string)."""
    if usage is not None:
        if kw:
            raise InvalidArgument("usage", "give a Usage/mapping or keywords, not both")
        if isinstance(usage, Usage):
            kw = {f: getattr(usage, f) for f in _TOKEN_FIELDS}
            kw.update(usage.units)
            if usage.service_tier:
                kw["service_tier"] = usage.service_tier
        elif isinstance(usage, Mapping):
            kw = dict(usage)
        else:
            raise InvalidArgument("usage", f"must be a Usage or a mapping, got "
                                           f"{type(usage).__name__}")
    out: dict[str, int] = {}
    for name, value in kw.items():
        if name == "service_tier":
            if not isinstance(value, str):
                raise InvalidArgument("usage.service_tier", f"must be a str, got {value!r}")
            out[name] = value
            continue
        if name not in _USAGE_FIELDS:
            raise InvalidArgument(f"usage.{name}", f"unknown usage field (one of "
                                                   f"{', '.join(_USAGE_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"usage.{name}", f"must be an int >= 0, got {value!r}")
        out[name] = value
    return out


class _MeterBase:
    """State and decisions shared by Meter and AsyncMeter; they differ only in how
    they wait for the client."""

    def __init__(self, client: Any, model: str, *, provider: str = "",
                 owners: Any = None, labels: Any = None, input_bytes: int = -1,
                 content: Any = None, max_output_tokens: int = 0,
                 privacy_mode: Any = None, ttl_seconds: int = 0, attempt: int = 0,
                 retry_of: str = "", revenue_nanos: int = 0, started: bool = True,
                 recorder: Any = None, fail_open: bool | None = None,
                 error_usage: str = "auto"):
        if error_usage not in ERROR_USAGE_MODES:
            raise InvalidArgument("error_usage", f"must be one of "
                                                 f"{', '.join(ERROR_USAGE_MODES)}")
        self._client = client
        self.model = model
        self._auth_kw: dict[str, Any] = dict(
            provider=provider, owners=owners, labels=labels, input_bytes=input_bytes,
            content=content, max_output_tokens=max_output_tokens,
            privacy_mode=privacy_mode, ttl_seconds=ttl_seconds, attempt=attempt,
            retry_of=retry_of)
        self.revenue_nanos = revenue_nanos
        self.started = bool(started)
        self.recorder = recorder
        self.fail_open_enabled = (getattr(client, "fail_open", False)
                                  if fail_open is None else bool(fail_open))
        self.error_usage = error_usage
        self.authorization: Authorization | None = None
        #: True when the service was unreachable and the call went ahead unmetered
        #: by Authorize (fail-open); the Record is then a meter-only event.
        self.fail_open = False
        self.usage: dict[str, int] | None = None
        self.usage_estimated = False
        #: The RecordResult / ReleaseResult once settled (None while open, and when
        #: the record was queued on a recorder: see `event_id`).
        self.result: RecordResult | ReleaseResult | None = None
        #: The Record's event id (also set when queued on a recorder).
        self.event_id = ""
        self.outcome: Outcome | None = None
        self._settled = False
        self._entered = False

    # -- what the block uses -------------------------------------------------------

    @property
    def output_token_cap(self) -> int:
        """The output cap to send to the provider (max_tokens & co.)."""
        self._need_entered()
        assert self.authorization is not None
        return self.authorization.output_token_cap

    @property
    def reservation_id(self) -> str:
        self._need_entered()
        assert self.authorization is not None
        return self.authorization.reservation_id

    @property
    def settled(self) -> bool:
        return self._settled

    def start(self) -> None:
        """Mark the provider call as started (see `started=False`)."""
        self.started = True

    def set_usage(self, usage: Any = None, *, estimated: bool = False, **kw: int) -> None:
        """The call's actual usage, recorded on exit (a `Usage`, a mapping, or
        keywords input_tokens, output_tokens, cached_input_tokens,
        cache_write_tokens, reasoning_tokens). Implies the call started.
        `estimated=True`: the numbers are the caller's estimate (the provider
        reported none), recorded with evidence ESTIMATED."""
        self.usage = usage_kwargs(usage, **kw)
        self.usage_estimated = bool(estimated)
        self.started = True

    def set_revenue(self, revenue_nanos: int) -> None:
        """What the tenant charged for this work (nano-USD), for margin."""
        self.revenue_nanos = revenue_nanos

    # -- decisions -----------------------------------------------------------------

    def _need_entered(self) -> None:
        if not self._entered:
            raise RuntimeError("use the meter as a context manager first (with / async with)")

    def _need_open(self) -> None:
        self._need_entered()
        if self._settled:
            raise RuntimeError("this meter was already recorded or released")

    def _authorize_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self._auth_kw.items() if v is not None}

    def _on_authorized(self, auth: Authorization) -> None:
        self.authorization = auth
        self._entered = True
        if auth.decision == Decision.DENY:
            self._settled = True  # a DENY reserves nothing: nothing to settle
            raise denial(auth)
        if auth.decision == Decision.WARN:
            log.info("p402 WARN for %s: %s", auth.model, ", ".join(auth.reasons))

    def _on_unreachable(self, err: Exception) -> None:
        """Fail-open: a local ALLOW; fail-closed: re-raise."""
        if not self.fail_open_enabled:
            raise err
        log.warning("p402 unreachable (%s); fail-open: %s goes ahead unauthorized and "
                    "will be recorded as a meter-only event", err, self.model)
        self.fail_open = True
        self.authorization = Authorization(
            decision=Decision.ALLOW, reasons=(FAIL_OPEN_REASON,), rule_ids=(),
            reservation_id="", estimated_cost_nanos=0, estimated_input_tokens=0,
            estimated_output_tokens=0,
            output_token_cap=int(self._auth_kw.get("max_output_tokens") or 0),
            budgets=(), model=self.model, provider=self._auth_kw.get("provider") or "",
            catalog_version="", expire_time_ms=0, retry_after_ms=0)
        self._entered = True

    def _record_kwargs(self, outcome: Outcome, usage: Mapping[str, int]) -> dict[str, Any]:
        """The Record's keywords (all but the reservation id)."""
        kw: dict[str, Any] = dict(usage)
        kw["outcome"] = outcome
        kw["event_id"] = self.event_id or _new_event_id()
        self.event_id = kw["event_id"]
        if self.revenue_nanos:
            kw["revenue_nanos"] = self.revenue_nanos
        a = self._auth_kw
        if a.get("attempt"):
            kw["attempt"] = a["attempt"]
        if a.get("retry_of"):
            kw["retry_of"] = a["retry_of"]
        if isinstance(a.get("input_bytes"), int) and a["input_bytes"] >= 0:
            kw["input_bytes"] = a["input_bytes"]
        # Always say what and whose the call was: a meter-only event (fail-open) needs
        # it, and so does the server when the hold is gone (authorized just before a
        # crash), so it can still meter the call instead of answering NOT_FOUND.
        kw["model"] = self.model
        for name in ("provider", "owners", "labels", "privacy_mode"):
            if a.get(name):
                kw[name] = a[name]
        return kw

    def _exit_plan(self, exc: BaseException | None) -> tuple[str, dict[str, Any]]:
        """("none" | "record" | "release", record keywords) for how the block ended."""
        if self._settled or self.authorization is None:
            return "none", {}
        outcome = outcome_for_exception(exc)
        self.outcome = outcome
        if self.usage is not None:
            kw = self._record_kwargs(outcome, self.usage)
            if self.usage_estimated:
                kw["usage_estimated"] = True
            return "record", kw
        if not self.started:
            return ("none" if self.fail_open else "release"), {}
        auth = self.authorization
        if exc is None:
            log.warning("p402: %s returned without usage; recording the estimate "
                        "(%d input, %d output tokens)", auth.model,
                        auth.estimated_input_tokens, auth.estimated_output_tokens)
            usage = {"input_tokens": auth.estimated_input_tokens,
                     "output_tokens": auth.estimated_output_tokens}
        elif self.error_usage == "estimate" or (
                self.error_usage == "auto"
                and outcome in (Outcome.TIMEOUT, Outcome.CANCELLED)):
            usage = {"input_tokens": auth.estimated_input_tokens}
        else:
            usage = {}
        # No usage came from the provider: what is recorded is derived from the
        # estimate (its tokens, or none by the rule above), so say so, and the
        # event's evidence is ESTIMATED rather than REPORTED.
        kw = self._record_kwargs(outcome, usage)
        kw["usage_estimated"] = True
        return "record", kw

    def _record_failed(self, err: Exception) -> None:
        if self.fail_open_enabled and isinstance(err, UNREACHABLE):
            log.warning("p402 record of %s failed (%s); fail-open: the reservation will "
                        "expire and be committed at its estimate", self.event_id, err)
            return
        raise err

    def __repr__(self) -> str:
        state = ("settled" if self._settled else "open" if self._entered else "new")
        return f"<{type(self).__name__} {self.model} {state}>"


def _new_event_id() -> str:
    from .ids import new_ulid

    return new_ulid()


class Meter(_MeterBase):
    """A metered call on a `P402Client` (`with p402.meter(...) as m:`)."""

    _client: "P402Client"
    recorder: "Recorder | None"

    def __enter__(self) -> "Meter":
        if self._entered:
            raise RuntimeError("a meter meters one call; make a new one")
        try:
            auth = self._client.authorize(self.model, **self._authorize_kwargs())
        except UNREACHABLE as err:
            self._on_unreachable(err)
            return self
        self._on_authorized(auth)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        action, kw = self._exit_plan(exc)
        if action == "record":
            self._do_record(kw, swallow=exc is not None)
        elif action == "release":
            self._do_release(swallow=exc is not None)
        self._settled = True

    def record(self, usage: Any = None, *, outcome: Any = Outcome.SUCCESS,
               **kw: int) -> RecordResult | None:
        """Record now (instead of on exit): usage as in `set_usage`. Returns the
        RecordResult (None when queued on a recorder or absorbed by fail-open)."""
        self._need_open()
        self.usage = usage_kwargs(usage, **kw)
        self.started = True
        self.outcome = Outcome.parse(outcome)
        self._do_record(self._record_kwargs(self.outcome, self.usage), swallow=False)
        self._settled = True
        return self.result if isinstance(self.result, RecordResult) else None

    def release(self) -> ReleaseResult | None:
        """Void the reservation now: the call was not made (None under fail-open,
        where no reservation exists)."""
        self._need_open()
        self._settled = True
        if self.fail_open:
            return None
        self._do_release(swallow=False)
        return self.result if isinstance(self.result, ReleaseResult) else None

    def _do_record(self, kw: dict[str, Any], *, swallow: bool) -> None:
        rid = self.authorization.reservation_id if self.authorization else ""
        try:
            if self.recorder is not None:
                self.event_id = self.recorder.record(rid, **kw)
            else:
                self.result = self._client.record(rid, **kw)
        except Exception as err:  # noqa: BLE001 - decided below
            if swallow:  # never mask the block's own exception
                log.error("p402 record of %s failed while the call raised: %s",
                          kw.get("event_id"), err)
                return
            self._record_failed(err)

    def _do_release(self, *, swallow: bool) -> None:
        assert self.authorization is not None
        try:
            self.result = self._client.release(self.authorization.reservation_id)
        except Exception as err:  # noqa: BLE001
            if swallow:
                log.error("p402 release of %s failed while the call raised: %s",
                          self.authorization.reservation_id, err)
                return
            self._record_failed(err)


class AsyncMeter(_MeterBase):
    """A metered call on an `AsyncP402Client` (`async with p402.meter(...) as m:`)."""

    _client: "AsyncP402Client"
    recorder: "AsyncRecorder | None"

    async def __aenter__(self) -> "AsyncMeter":
        if self._entered:
            raise RuntimeError("a meter meters one call; make a new one")
        try:
            auth = await self._client.authorize(self.model, **self._authorize_kwargs())
        except UNREACHABLE as err:
            self._on_unreachable(err)
            return self
        self._on_authorized(auth)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        action, kw = self._exit_plan(exc)
        # A cancelled task must still settle its reservation: shield the call so the
        # cancellation that ended the block does not also cancel the Record.
        if action == "record":
            await _shielded(self._do_record(kw, swallow=exc is not None))
        elif action == "release":
            await _shielded(self._do_release(swallow=exc is not None))
        self._settled = True

    async def record(self, usage: Any = None, *, outcome: Any = Outcome.SUCCESS,
                     **kw: int) -> RecordResult | None:
        """See Meter.record."""
        self._need_open()
        self.usage = usage_kwargs(usage, **kw)
        self.started = True
        self.outcome = Outcome.parse(outcome)
        await self._do_record(self._record_kwargs(self.outcome, self.usage), swallow=False)
        self._settled = True
        return self.result if isinstance(self.result, RecordResult) else None

    async def release(self) -> ReleaseResult | None:
        """See Meter.release."""
        self._need_open()
        self._settled = True
        if self.fail_open:
            return None
        await self._do_release(swallow=False)
        return self.result if isinstance(self.result, ReleaseResult) else None

    async def _do_record(self, kw: dict[str, Any], *, swallow: bool) -> None:
        rid = self.authorization.reservation_id if self.authorization else ""
        try:
            if self.recorder is not None:
                self.event_id = await self.recorder.record(rid, **kw)
            else:
                self.result = await self._client.record(rid, **kw)
        except Exception as err:  # noqa: BLE001
            if swallow:
                log.error("p402 record of %s failed while the call raised: %s",
                          kw.get("event_id"), err)
                return
            self._record_failed(err)

    async def _do_release(self, *, swallow: bool) -> None:
        assert self.authorization is not None
        try:
            self.result = await self._client.release(self.authorization.reservation_id)
        except Exception as err:  # noqa: BLE001
            if swallow:
                log.error("p402 release of %s failed while the call raised: %s",
                          self.authorization.reservation_id, err)
                return
            self._record_failed(err)


async def _shielded(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Cancelled again while settling: let the settle finish, then propagate.
        await task
        raise


def meter(client: Any, model: str, **kw: Any) -> Meter | AsyncMeter:
    """A meter on `client`: a `Meter` for P402Client, an `AsyncMeter` for
    AsyncP402Client: the same as `client.meter(model, ...)`, which it is."""
    return client.meter(model, **kw)


__all__ = ["meter", "Meter", "AsyncMeter", "outcome_for_exception", "usage_kwargs",
           "FAIL_OPEN_REASON", "UNREACHABLE", "ERROR_USAGE_MODES"]

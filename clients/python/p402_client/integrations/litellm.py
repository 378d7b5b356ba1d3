"""P402 as a LiteLLM callback: authorize before each call, record after it.

This module owns `P402Callback`, a `litellm.integrations.custom_logger.CustomLogger`.

    import litellm
    from p402_client import AsyncP402Client
    from p402_client.integrations.litellm import P402Callback

    p402 = AsyncP402Client("127.0.0.1:4020", api_key="p402_…")
    litellm.callbacks = [P402Callback(p402, owners={"feature": "search"})]
    await litellm.acompletion(model="gpt-4o-mini", messages=[...],
                              metadata={"p402": {"customer": "acme",
                                                 "labels": {"region": "eu"}}})

Where it hooks in (LiteLLM's own hooks; nothing is patched):
- `async_pre_call_deployment_hook` — LiteLLM runs it for every callback before an
  async SDK call (`litellm.acompletion`, the Router) and lets its exceptions through;
- `async_pre_call_hook` — the LiteLLM proxy's documented pre-call hook (its
  `data` carries the request; `data["metadata"]` / `data["litellm_metadata"]`);
- `async_log_success_event` / `async_log_failure_event` — after the call.

Before the call: owners are the callback's, updated by the call's
`metadata={"p402": {"customer": …, "feature": …, "labels": {…}}}` (also read from
`litellm_params.metadata` / `litellm_metadata`, as the proxy passes them); the model
and provider come from the request (`openai/gpt-4o-mini` -> provider `openai`, model
`gpt-4o-mini`; else `custom_llm_provider`); the prompt is measured in bytes like
`wrap_openai` does; the output cap asked for (`max_completion_tokens` or
`max_tokens`) is authorized and the allowed cap written back into the request. A
DENY raises LiteLLM's own `litellm.BudgetExceededError` (current cost = the
refusing budget's committed + held, max budget = its limit, in USD as LiteLLM
reports budgets; the P402 reasons in the message and the typed P402 denial as
`.p402_denial`), so callers handle a P402 denial like any LiteLLM budget error.

After the call: success records the usage of the response (prompt, completion,
cached, cache-creation and reasoning tokens); failure records the outcome mapped
from the exception (`litellm.Timeout` -> TIMEOUT, else PROVIDER_ERROR) with the
`p402_client.meter` rules for usage. A streamed call is recorded when LiteLLM
reports the assembled stream's success (LiteLLM sums its usage).

Reservations are kept by `litellm_call_id` between the hooks, at most `max_open`
of them: a call whose success/failure event never comes is not lost — its
reservation expires and is committed at its estimate.

Sync `litellm.completion` gives callbacks no blocking pre-call hook (its pre-call
logging swallows exceptions), so this callback meters async calls and the proxy;
sync callers meter with `P402Client.meter(...)` around the call.

Register one P402Callback per process: LiteLLM copies `litellm.callbacks` into its
internal success/failure lists on first use and keeps the first instance of a
callback class there.

Fail-open/closed and background recording follow the client (`fail_open=`,
`recorder=` an `AsyncRecorder`), as for `meter`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Mapping

import litellm
from litellm.integrations.custom_logger import CustomLogger

from ..errors import Denied
from ..meter import AsyncMeter, usage_kwargs
from ..openai import CHAT, _get, measure_input_bytes, usage_from_openai
from ..types import NANOS_PER_USD, OWNER_KEYS

log = logging.getLogger("p402_client.integrations.litellm")

METADATA_KEY = "p402"
# The request key LiteLLM's success/failure events carry for one logical call.
_CALL_ID = "litellm_call_id"


def _metadata_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """The call's P402 metadata from wherever LiteLLM put the caller's metadata."""
    found: dict[str, Any] = {}
    sources = [data.get("metadata"), data.get("litellm_metadata")]
    lp = data.get("litellm_params")
    if isinstance(lp, Mapping):
        sources += [lp.get("metadata"), lp.get("litellm_metadata")]
    for src in sources:
        if isinstance(src, Mapping) and isinstance(src.get(METADATA_KEY), Mapping):
            found.update(src[METADATA_KEY])
    return found


def split_model(model: str, custom_llm_provider: Any = None) -> tuple[str, str]:
    """(provider, model) of a LiteLLM model name ("openai/gpt-4o-mini")."""
    if isinstance(custom_llm_provider, str) and custom_llm_provider:
        prefix = custom_llm_provider + "/"
        return custom_llm_provider, model[len(prefix):] if model.startswith(prefix) else model
    if "/" in model:
        provider, _, rest = model.partition("/")
        return provider, rest
    return "", model


def litellm_usage(usage: Any) -> dict[str, int] | None:
    """Record keywords from a LiteLLM Usage (OpenAI shape plus cache creation)."""
    kw = usage_from_openai(usage)
    if kw is None:
        return None
    write = _get(usage, "cache_creation_input_tokens")
    if isinstance(write, int) and write > 0:
        kw["cache_write_tokens"] = min(write, kw.get("input_tokens", 0))
    return usage_kwargs(**kw)


def budget_error(denial: Denied) -> litellm.BudgetExceededError:
    """LiteLLM's BudgetExceededError for a P402 denial (USD floats only for display:
    LiteLLM's exception reports budgets that way; P402's exact ints ride along in
    `.p402_denial.authorization`)."""
    auth = denial.authorization
    refusing = [b for b in auth.budgets if b.remaining_nanos < auth.estimated_cost_nanos]
    b = (refusing or list(auth.budgets) or [None])[0]
    current = (b.committed_nanos + b.held_nanos) / NANOS_PER_USD if b else 0.0
    limit = b.limit_nanos / NANOS_PER_USD if b else 0.0
    err = litellm.BudgetExceededError(
        current_cost=current, max_budget=limit,
        message=f"P402 denied {auth.model or 'the call'}: {', '.join(denial.reasons)}",
        entity_type="p402_budget" if b else "p402_policy",
        entity_id=b.budget_id if b else ",".join(denial.rule_ids))
    err.p402_denial = denial  # type: ignore[attr-defined]
    return err


class P402Callback(CustomLogger):
    """Authorize before each LiteLLM call and record after it (module docstring)."""

    def __init__(self, p402: Any, *, owners: Mapping[str, str] | None = None,
                 labels: Mapping[str, str] | None = None, recorder: Any = None,
                 fail_open: bool | None = None, max_open: int = 100_000, **kw: Any):
        from ..client import AsyncP402Client

        if not isinstance(p402, AsyncP402Client):
            raise TypeError("P402Callback needs an AsyncP402Client (LiteLLM's hooks are async)")
        super().__init__(**kw)
        self.p402 = p402
        self.owners = dict(owners or {})
        self.labels = dict(labels or {})
        self.recorder = recorder
        self.fail_open = fail_open
        self.max_open = max_open
        self._open: OrderedDict[str, AsyncMeter] = OrderedDict()

    # -- before ----------------------------------------------------------------------

    async def _authorize(self, data: dict[str, Any]) -> dict[str, Any]:
        call_id = data.get(_CALL_ID)
        if call_id and call_id in self._open:
            return data  # the proxy and the deployment hook both ran: authorize once
        model_name = data.get("model")
        if not isinstance(model_name, str) or not model_name:
            return data  # nothing to price (e.g. a pass-through route)
        provider, model = split_model(model_name, data.get("custom_llm_provider"))
        meta = _metadata_of(data)
        owners = dict(self.owners)
        owners.update({k: v for k, v in meta.items() if k in OWNER_KEYS})
        labels = {**self.labels, **dict(meta.get("labels") or {})}
        cap_name = "max_completion_tokens" if data.get("max_completion_tokens") else "max_tokens"
        requested = data.get(cap_name)
        m = AsyncMeter(self.p402, model, provider=provider, owners=owners or None,
                       labels=labels or None,
                       input_bytes=measure_input_bytes(CHAT, data),
                       max_output_tokens=requested if isinstance(requested, int) else 0,
                       revenue_nanos=int(meta.get("revenue_nanos") or 0),
                       recorder=self.recorder, fail_open=self.fail_open)
        try:
            await m.__aenter__()
        except Denied as denial:
            raise budget_error(denial) from denial
        if m.output_token_cap > 0:
            data[cap_name] = m.output_token_cap
        if call_id:
            self._open[call_id] = m
            while len(self._open) > self.max_open:
                old_id, _ = self._open.popitem(last=False)
                log.warning("p402: too many open LiteLLM calls; %s will expire", old_id)
        return data

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any],
                                             call_type: Any) -> dict[str, Any] | None:
        return await self._authorize(kwargs)

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict,
                                  call_type: Any) -> dict | None:
        return await self._authorize(data)

    # -- after -----------------------------------------------------------------------

    def _pop(self, kwargs: Mapping[str, Any]) -> AsyncMeter | None:
        call_id = kwargs.get(_CALL_ID)
        return self._open.pop(call_id, None) if call_id else None

    async def async_log_success_event(self, kwargs: dict, response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        m = self._pop(kwargs)
        if m is None:
            return
        usage = litellm_usage(_get(response_obj, "usage"))
        if usage is not None:
            m.set_usage(usage)
        try:
            await m.__aexit__(None, None, None)
        except Exception:  # noqa: BLE001 - LiteLLM logs callback errors and moves on
            log.exception("p402: record after a LiteLLM success failed")

    async def async_log_failure_event(self, kwargs: dict, response_obj: Any,
                                      start_time: Any, end_time: Any) -> None:
        m = self._pop(kwargs)
        if m is None:
            return
        exc = kwargs.get("exception")
        if not isinstance(exc, BaseException):
            exc = RuntimeError(str(exc or "LiteLLM call failed"))
        try:
            await m.__aexit__(type(exc), exc, None)
        except Exception:  # noqa: BLE001
            log.exception("p402: record after a LiteLLM failure failed")

    async def async_post_call_failure_hook(self, *args: Any, **kwargs: Any) -> None:
        return None  # the failure event above records; nothing to change here


__all__ = ["P402Callback", "budget_error", "litellm_usage", "split_model", "METADATA_KEY"]

"""Billing exports: ledger events as the usage events billing systems ingest, so a
tenant bills its customers for what P402 metered without re-metering anything.

Owns three formats, one output event per ledger event that cost or sold something
(denied and released calls are left out), each keyed by the ledger event's id so a
re-export of the same events never bills twice (the billing system deduplicates on
the key):

- `stripe`: Stripe Billing meter events (the body of POST /v1/billing/meter_events):
  {"event_name", "identifier", "timestamp", "payload": {"stripe_customer_id",
  "value"}}. `identifier` is "p402-" + the event id (<= 100 characters, Stripe's
  bound), `timestamp` the call's time in whole Unix seconds, `value` a string of a
  whole number (Stripe meters sum it): the event's revenue in micro-USD by default
  (`--value cost` for cost), rounded half-up — a meter priced per unit of 1e-6 USD.
  `stripe_customer_id` is the P402 customer, or its id from a customer map.
- `openmeter`: CloudEvents 1.0 JSON (structured mode), what OpenMeter ingests:
  id = the event id, source "p402/<tenant id>", type (default "p402.ai_call"),
  subject = the customer, time RFC 3339 UTC, datacontenttype application/json,
  data = {model, provider, feature, workflow, cost_nanos, revenue_nanos, usage…}.
- `lago`: Lago events (the body of POST /api/v1/events, one "event" each):
  {"transaction_id": the event id, "external_subscription_id": the customer (or its
  id from a customer map), "code" (default "p402_ai_call"), "timestamp" (Unix
  seconds), "properties": {the same data, amounts as strings}}.
"""
from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Mapping

from p402core import InvalidArgument

FORMATS = ("stripe", "openmeter", "lago")
_TOKENS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
           "reasoning_tokens")


def _micro(nanos: int) -> str:
    return str(int((Decimal(nanos) / 1000).to_integral_value(rounding=ROUND_HALF_UP)))


def _data(ev) -> dict[str, Any]:
    usage = {k: getattr(ev, k) for k in _TOKENS if getattr(ev, k)}
    usage.update(ev.units or {})
    return {"model": ev.model, "provider": ev.provider, "feature": ev.feature,
            "workflow": ev.workflow, "cost_nanos": ev.cost_nanos,
            "revenue_nanos": ev.revenue_nanos, "usage": usage,
            **({"service_tier": ev.service_tier} if ev.service_tier else {})}


def _rfc3339(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def export(events: Iterable, fmt: str, *, tenant_id: str, name: str = "",
           value: str = "revenue", customers: Mapping[str, str] | None = None) -> list[dict]:
    """The billing events of `events` (LedgerEvents) in `fmt` (module docstring).
    `name`: the meter event name / CloudEvents type / Lago code (a default per
    format); `customers`: P402 customer -> the billing system's customer id."""
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"must be one of {', '.join(FORMATS)}")
    if value not in ("revenue", "cost"):
        raise InvalidArgument("value", "must be revenue or cost")
    customers = customers or {}
    out = []
    for ev in events:
        if not ev.cost_nanos and not ev.revenue_nanos:
            continue
        who = customers.get(ev.customer, ev.customer)
        if fmt == "stripe":
            if not who:
                raise InvalidArgument("customer", f"event {ev.event_id} has no customer: "
                                      "Stripe needs stripe_customer_id")
            amount = ev.revenue_nanos if value == "revenue" else ev.cost_nanos
            out.append({"event_name": name or f"p402_{value}_micro_usd",
                        "identifier": "p402-" + ev.event_id,
                        "timestamp": ev.event_ms // 1000,
                        "payload": {"stripe_customer_id": who, "value": _micro(amount)}})
        elif fmt == "openmeter":
            out.append({"specversion": "1.0", "id": ev.event_id,
                        "source": f"p402/{tenant_id}", "type": name or "p402.ai_call",
                        "subject": who, "time": _rfc3339(ev.event_ms),
                        "datacontenttype": "application/json", "data": _data(ev)})
        else:
            props = _data(ev)
            props["cost_nanos"], props["revenue_nanos"] = (str(props["cost_nanos"]),
                                                           str(props["revenue_nanos"]))
            out.append({"transaction_id": ev.event_id, "external_subscription_id": who,
                        "code": name or "p402_ai_call", "timestamp": ev.event_ms // 1000,
                        "properties": props})
    return out


__all__ = ["FORMATS", "export"]

"""p402_client: the Python SDK of P402 — authorize, record, release, query, admin.

Gateways call `authorize()` before an AI provider call and `record()` after it;
finance reads the ledger with `query()` / `export()`. Every result is a plain frozen
dataclass (see `p402_client.types`); money is an int of nano-USD everywhere.

    from p402_client import P402Client

    with P402Client("127.0.0.1:4020", api_key="p402_…") as p402:
        auth = p402.authorize("gpt-4o-mini", owners={"customer": "acme"},
                              input_bytes=1200, max_output_tokens=256)
        if auth.allowed:
            ...  # call the provider with max_tokens=auth.output_token_cap
            p402.record(auth.reservation_id, input_tokens=310, output_tokens=118)

Errors are `P402Error` subclasses with `.code`, `.reason` and `.field`.

Metering helpers (each module's docstring has the exact rules):
- `p402.meter(model, …)` / `meter(client, model, …)`: one call as a (sync or async)
  context manager — authorize on enter (DENY raises `BudgetDenied` /
  `PolicyDenied`), record or release on exit, error outcomes from exceptions.
- `Recorder` / `AsyncRecorder`: background batched recording, fail-closed or
  fail-open.
- `p402_client.openai.wrap_openai(openai_client, p402, owners=…)`: the official
  OpenAI SDK, metered (streaming included).
- `p402_client.integrations.litellm.P402Callback`: a LiteLLM callback.
- `GatewaySigner` / `P402Client(..., gateway_id=…, gateway_secret=…)`: signed
  reports of a tenant's own gateway (privacy mode private_gateway; evidence
  ATTESTED). `register_gateway()` returns the secret once.
"""
from __future__ import annotations

import logging as _logging

from .client import AsyncP402Client, P402Client, __version__
from .errors import (
    BudgetDenied,
    DeadlineExceeded,
    Denied,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    P402Error,
    PermissionDenied,
    PolicyDenied,
    RecorderFull,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .ids import new_ulid
from .meter import AsyncMeter, Meter, meter
from .pipeline import AuthorizePipeline
from .recorder import AsyncRecorder, Recorder, RecorderMetrics
from .signing import GatewaySigner
from .usage import usage_from_anthropic, usage_from_gemini
from .types import (
    ApiKey,
    Authorization,
    Budget,
    BudgetStatus,
    CreatedKey,
    Decision,
    Effect,
    Enforcement,
    Event,
    Evidence,
    Gateway,
    Outcome,
    Owners,
    Page,
    Period,
    Ping,
    PolicyRule,
    Price,
    PriceImport,
    PrivacyMode,
    RateUnit,
    RecordResult,
    RegisteredGateway,
    ReleaseResult,
    Scope,
    Settings,
    SpendRow,
    Usage,
    format_usd,
)

__all__ = [
    "usage_from_anthropic",
    "usage_from_gemini",
    "AuthorizePipeline",
    "__version__",
    "P402Client",
    "AsyncP402Client",
    "P402Error",
    "InvalidArgument",
    "Unauthenticated",
    "PermissionDenied",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Denied",
    "BudgetDenied",
    "PolicyDenied",
    "RecorderFull",
    "meter",
    "Meter",
    "AsyncMeter",
    "Recorder",
    "AsyncRecorder",
    "RecorderMetrics",
    "GatewaySigner",
    "new_ulid",
    "format_usd",
    "ApiKey",
    "Authorization",
    "Budget",
    "BudgetStatus",
    "CreatedKey",
    "Decision",
    "Effect",
    "Enforcement",
    "Event",
    "Evidence",
    "Gateway",
    "Outcome",
    "Owners",
    "Page",
    "Period",
    "Ping",
    "PolicyRule",
    "Price",
    "PriceImport",
    "PrivacyMode",
    "RateUnit",
    "RecordResult",
    "RegisteredGateway",
    "ReleaseResult",
    "Scope",
    "Settings",
    "SpendRow",
    "Usage",
]

# A library adds no handler but NullHandler (the logging HOWTO): the SDK's log lines
# go where the application's logging config sends them, never to stderr through
# logging's last-resort handler when the application configured none.
_logging.getLogger("p402_client").addHandler(_logging.NullHandler())

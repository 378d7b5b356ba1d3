"""P402 in front of the LiteLLM *proxy server*: deny before the call with the HTTP status
an OpenAI client expects, record after it.

The LiteLLM proxy honours an exception raised by a callback's `async_pre_call_hook`
as the answer to the call (the SDK's `litellm.completion` does not: use
`p402_client.integrations.litellm.P402Callback` there). This module's
`P402ProxyHook` is that callback for the proxy:

- before the call: Authorize (P402Callback's rules), owners taken from what the proxy
  knows: the request's `user` -> customer, the key's team (`team_alias`, else
  `team_id`) -> department, the key's user -> employee, then the call's
  `metadata={"p402": {...}}` (which wins). A DENY is raised as fastapi's HTTPException
  (the proxy's own web framework): 402 for a budget (`budget.exceeded`, the budget in
  the message), 429 with Retry-After for `policy.rate_limited`, 403 for another policy,
  with the P402 reasons in the body;
- after it: success records LiteLLM's usage (prompt, completion, cached, cache-write,
  reasoning tokens); failure records PROVIDER_ERROR / TIMEOUT with no reported usage
  (cost 0: the reservation is given back).

Use it from the proxy's config.yaml. LiteLLM loads callbacks from a Python file next
to the config, so add a one-line `p402_hook.py` there:

    # p402_hook.py
    from p402_client.integrations.litellm_proxy import proxy_handler_instance

    # config.yaml
    litellm_settings:
      callbacks: p402_hook.proxy_handler_instance

`proxy_handler_instance` connects on first use to P402_TARGET (HOST:PORT) with
P402_API_KEY (a meter key), both from the environment.
"""
from __future__ import annotations

import math
import os
from typing import Any

from .litellm import METADATA_KEY, P402Callback

OWNER_FROM_KEY = (("team_alias", "department"), ("team_id", "department"),
                  ("user_id", "employee"))


def _http_error(exc: BaseException) -> BaseException:
    """A P402 denial as the HTTPException the LiteLLM proxy answers with."""
    from fastapi import HTTPException

    denial = getattr(exc, "p402_denial", None)
    auth = getattr(denial, "authorization", None)
    reasons = list(getattr(auth, "reasons", ()) or ())
    detail = {"error": {"message": str(exc), "type": "p402_denied",
                        "code": reasons[0] if reasons else "denied"},
              "p402": {"reasons": reasons}}
    headers = {}
    if any(r.startswith("budget.") for r in reasons):
        status = 402
    elif "policy.rate_limited" in reasons:
        status = 429
        ms = int(getattr(auth, "retry_after_ms", 0) or 0)
        headers["Retry-After"] = str(max(1, math.ceil(ms / 1000)))
    else:
        status = 403
    return HTTPException(status_code=status, detail=detail, headers=headers or None)


class P402ProxyHook(P402Callback):
    """P402Callback for the LiteLLM proxy (module docstring)."""

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict,
                                  call_type: Any) -> dict | None:
        owners = {}
        if isinstance(data.get("user"), str) and data["user"]:
            owners["customer"] = data["user"]
        for attr, dim in OWNER_FROM_KEY:
            value = getattr(user_api_key_dict, attr, None)
            if isinstance(value, str) and value and dim not in owners:
                owners[dim] = value
        if owners:
            meta = data.setdefault("metadata", {})
            if isinstance(meta, dict):
                mine = meta.setdefault(METADATA_KEY, {})
                if isinstance(mine, dict):
                    for k, v in owners.items():
                        mine.setdefault(k, v)  # the call's own p402 metadata wins
        try:
            return await self._authorize(data)
        except Exception as exc:
            if getattr(exc, "p402_denial", None) is not None:
                raise _http_error(exc) from exc
            raise


def from_environment() -> P402ProxyHook:
    """The hook connected to P402_TARGET with P402_API_KEY (a meter key)."""
    from ..client import AsyncP402Client

    target, key = os.environ.get("P402_TARGET"), os.environ.get("P402_API_KEY")
    if not target or not key:
        raise RuntimeError("p402: set P402_TARGET and P402_API_KEY for the LiteLLM proxy hook")
    return P402ProxyHook(AsyncP402Client(target, api_key=key))


# What a proxy config names (module docstring); None where P402 is not configured.
proxy_handler_instance = from_environment() if os.environ.get("P402_TARGET") else None


__all__ = ["P402ProxyHook", "from_environment", "proxy_handler_instance"]

"""Envoy external authorization: `envoy.service.auth.v3.Authorization/Check`.

Owns the translation of Envoy's CheckRequest into a P402 Authorize and of the
decision into a CheckResponse. It runs inside the P402 server (`p402 serve
--ext-authz`, registered by `server.create_server(ext_authz=…)`), on the same event
loop, key cache and tenant runtimes as MeterService: a Check is an in-memory decision,
no RPC hop. Stubs come from the `xds-protos` package (extra `envoy`).

What a Check reads (AttributeContext)
- The P402 key: `authorization: Bearer p402_…` (or `x-p402-key`) of the HTTP request,
  else the route's context extension `p402_key` (a key per route, when callers do not
  carry one). It must have the `meter` scope; the tenant comes from it.
- Owners: the route's context extensions `customer`, `feature`, `workflow`, `task`,
  `department`, `employee` (set by the operator in the route config) win over the
  caller's `x-p402-<owner>` headers; labels from context extensions `label.<k>` and
  headers `x-p402-label-<k>` (the extension wins). `provider` from the context
  extension (default `EnvoyConfig.provider`).
- Model and output cap: from the JSON body when the filter sends it
  (`with_request_body`): `model`, and `max_completion_tokens` / `max_tokens` /
  `max_output_tokens`; else the `x-p402-model` header or the `model` context
  extension. Input bytes: the body's length (`raw_body`, `body`, else the request's
  `size` / content-length): the whole request, a conservative prompt size.
- Retries: `x-p402-attempt`, `x-p402-retry-of`.

What it answers
- ALLOW / WARN: status OK; `ok_response` adds `x-p402-reservation-id`,
  `x-p402-decision` and `x-p402-output-token-cap` to the upstream request (and
  removes the caller's `authorization` when `EnvoyConfig.strip_authorization`,
  for an upstream that takes a key of its own). The upstream, or whatever relays its
  answer, Records with that reservation id; a reservation never recorded expires and
  is committed at its estimate (outcome EXPIRED: spend is never under-counted).
- DENY: `denied_response` 402 (a budget reason) or 429 with Retry-After
  (`policy.rate_limited`), else 403, with an OpenAI-style JSON body
  `{"error": {"message", "type", "code", "param": null}, "p402": {…}}`.
- Bad input: 400 naming the field; missing or unknown key: 401; no meter scope: 403.
- `dynamic_metadata` (Envoy puts it under `envoy.filters.http.ext_authz`): decision,
  reservation_id, reasons, and estimated_cost_nanos / output_token_cap as decimal
  strings — a protobuf Struct number is a double, and money never goes through a
  float.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from p402.v1 import common_pb2, meter_pb2
from p402_server.api.auth import METER
from p402_server.wire.errors import ServiceError
from p402core import InvalidArgument

log = logging.getLogger("p402.server.envoy")

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
OWNER_KEYS = ("customer", "feature", "workflow", "task", "department", "employee")
LABEL_HEADER = "x-p402-label-"
CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# A body larger than this is not parsed for the model (Envoy's max_request_bytes
# bounds it anyway); its length still counts.
MAX_PARSED_BODY = 8 * 1024 * 1024
# The largest values of AuthorizeRequest's int32 and int64 fields
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


@dataclass(frozen=True)
class EnvoyConfig:
    """How `--ext-authz` answers."""

    provider: str = ""  # provider for price lookup when the route gives none
    strip_authorization: bool = False  # remove the caller's authorization upstream


class _Denied(Exception):
    """A Check answered with a denied_response."""

    def __init__(self, http_status: int, grpc_code: int, type_: str, code: str,
                 message: str, *, param: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.http_status, self.grpc_code = http_status, grpc_code
        self.type, self.code, self.message, self.param = type_, code, message, param
        self.headers, self.extra = headers or {}, extra

    def response(self) -> external_auth_pb2.CheckResponse:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}
        if self.extra:
            body["p402"] = self.extra
        headers = {"content-type": "application/json", **self.headers}
        resp = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=self.grpc_code, message=self.message),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=self.http_status),
                headers=[_header(k, v) for k, v in headers.items()],
                body=json.dumps(body, separators=(",", ":"))))
        meta = {"decision": "DENY", "code": self.code}
        if self.extra:
            meta["reasons"] = ",".join(self.extra.get("reasons", ()))
            if "estimated_cost_nanos" in self.extra:
                meta["estimated_cost_nanos"] = str(self.extra["estimated_cost_nanos"])
        resp.dynamic_metadata.update(meta)
        return resp


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


class _KeyContext:
    """The one thing KeyCache.authenticate reads from a gRPC context: the metadata.
    Here the key comes from the HTTP request Envoy describes."""

    def __init__(self, api_key: str):
        self._md = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def invocation_metadata(self):
        return self._md


def _headers(http) -> dict[str, str]:
    headers = {k.lower(): v for k, v in http.headers.items()}
    if not headers and http.HasField("header_map"):
        for h in http.header_map.headers:
            headers[h.key.lower()] = h.value or h.raw_value.decode("utf-8", "replace")
    return headers


def _int_header(headers: dict, name: str, hi: int = INT64_MAX) -> int:
    v = headers.get(name, "")
    if not v:
        return 0
    # ASCII digits only: str.isdigit() also takes "²" (int() refuses it) and "٣" (read
    # as a number nobody wrote)
    if not (v.isascii() and v.isdigit()):
        raise _bad(name, "must be a non-negative integer")
    if len(v.lstrip("0")) > len(str(hi)) or int(v) > hi:
        raise _bad(name, f"must be at most {hi}")
    return int(v)


def _text(field: str, value: str) -> str:
    """`value` when it can go into a protobuf string (UTF-8: no lone surrogate, which a
    JSON escape such as "\\ud800" can make)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(field, "is not valid Unicode text (a lone surrogate)") from None
    return value


def _bad(field: str, message: str) -> _Denied:
    return _Denied(400, code_pb2.INVALID_ARGUMENT, "invalid_request_error",
                   "invalid_argument", f"{field}: {message}", param=field)


def authorize_request(check: external_auth_pb2.CheckRequest, config: EnvoyConfig
                      ) -> tuple[str, meter_pb2.AuthorizeRequest]:
    """CheckRequest -> (the P402 key, the AuthorizeRequest) per the module docstring."""
    attrs = check.attributes
    http = attrs.request.http
    key, req, _body = authorize_from(_headers(http), dict(attrs.context_extensions),
                                     http.raw_body or http.body.encode("utf-8"), http.size,
                                     config)
    return key, req


def authorize_from(headers: dict[str, str], ext: dict[str, str], raw: bytes, size: int,
                   config: EnvoyConfig) -> tuple[str, meter_pb2.AuthorizeRequest, dict]:
    """A request's lowercased headers, the route's context extensions, its body and
    declared size -> (the P402 key, the AuthorizeRequest, the JSON body as a dict, or {}
    when it is not one). ext_authz (from a CheckRequest) and ext_proc share it."""
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not key.startswith("p402_"):
        key = headers.get("x-p402-key", "") or ext.get("p402_key", "")

    body: dict = {}
    if raw and len(raw) <= MAX_PARSED_BODY and "json" in headers.get("content-type",
                                                                       "application/json"):
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        except RecursionError:
            raise _bad("body", "the request body's JSON is nested too deeply") from None
        if isinstance(parsed, dict):
            body = parsed
    model = _text("model", body["model"]) if isinstance(body.get("model"), str) else ""
    model = model or headers.get("x-p402-model", "") or ext.get("model", "")
    if not model:
        raise _bad("model", "is required: in the JSON body (with_request_body), the "
                            "x-p402-model header or the route's `model` context extension")
    cap = 0
    for name in CAP_FIELDS:
        v = body.get(name)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _bad(name, "must be a non-negative integer")
            if v > INT64_MAX:
                raise _bad(name, f"must be at most {INT64_MAX}")
            cap = v
            break
    if raw:
        input_bytes = len(raw)
    elif size > 0:
        input_bytes = size
    else:
        input_bytes = _int_header(headers, "content-length")

    owners = common_pb2.Owners()
    for dim in OWNER_KEYS:
        value = ext.get(dim) or headers.get(f"x-p402-{dim}", "")
        if value:
            setattr(owners, dim, value)
    labels = {h[len(LABEL_HEADER):]: v for h, v in headers.items()
              if h.startswith(LABEL_HEADER) and len(h) > len(LABEL_HEADER)}
    labels.update({k[6:]: v for k, v in ext.items() if k.startswith("label.") and k[6:]})
    req = meter_pb2.AuthorizeRequest(
        model=model, provider=ext.get("provider", "") or config.provider, owners=owners,
        labels=labels, input_bytes=input_bytes, max_output_tokens=cap,
        attempt=_int_header(headers, "x-p402-attempt", INT32_MAX),
        retry_of=headers.get("x-p402-retry-of", ""))
    return key, req, body


def _denial(resp: meter_pb2.AuthorizeResponse) -> _Denied:
    reasons = list(resp.reasons)
    text = ", ".join(reasons) or "denied"
    cost = resp.estimated_cost.units * 1_000_000_000 + resp.estimated_cost.nanos
    extra = {"decision": "DENY", "reasons": reasons, "rule_ids": list(resp.rule_ids),
             "estimated_cost_nanos": cost}
    budget = [r for r in reasons if r.startswith("budget.")]
    if budget:
        return _Denied(402, code_pb2.PERMISSION_DENIED, "insufficient_quota", budget[0],
                       f"P402 budget denied this call ({text})", extra=extra)
    if "policy.rate_limited" in reasons:
        headers = {}
        if resp.retry_after_ms >= 0:
            headers["retry-after"] = str(max(1, math.ceil(resp.retry_after_ms / 1000)))
        extra["retry_after_ms"] = resp.retry_after_ms
        return _Denied(429, code_pb2.RESOURCE_EXHAUSTED, "rate_limit_error",
                       "policy.rate_limited", f"P402 rate limit ({text})", headers=headers,
                       extra=extra)
    return _Denied(403, code_pb2.PERMISSION_DENIED, "permission_denied",
                   reasons[0] if reasons else "policy.denied",
                   f"P402 policy denied this call ({text})", extra=extra)


def _service_error(exc: ServiceError) -> _Denied:
    import grpc

    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        return _Denied(401, code_pb2.UNAUTHENTICATED, "invalid_request_error",
                       "invalid_api_key", f"P402: {exc.message}")
    if exc.code == grpc.StatusCode.PERMISSION_DENIED:
        return _Denied(403, code_pb2.PERMISSION_DENIED, "permission_denied",
                       "permission_denied", f"P402: {exc.message}")
    if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return _bad(exc.field or "request", exc.message)
    # Anything else: no decision, no spend (Envoy then applies its own failure mode).
    return _Denied(503, code_pb2.UNAVAILABLE, "server_error", "p402_unavailable",
                   f"P402: {exc.message}")


class ExtAuthzService(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's Authorization service over the server's runtime and key cache."""

    def __init__(self, runtime, auth, config: EnvoyConfig | None = None):
        self.runtime = runtime
        self.auth = auth
        self.config = config or EnvoyConfig()

    async def Check(self, request, context):
        try:
            return await self._check(request)
        except _Denied as d:
            return d.response()

    async def _check(self, check):
        key, req = authorize_request(check, self.config)
        if not key:
            raise _Denied(401, code_pb2.UNAUTHENTICATED, "invalid_request_error",
                          "invalid_api_key", "a P402 API key is required: "
                          "authorization: Bearer p402_… (or the route's p402_key)")
        try:
            info = await self.auth.authenticate(_KeyContext(key), METER, "Check", "meter")
            rt = (self.runtime.tenants.get(info.tenant_id)
                  or await self.runtime.get(info.tenant_id))
            resp = await rt.authorize_exact(req)
        except ServiceError as exc:
            raise _service_error(exc) from None
        except InvalidArgument as exc:
            raise _bad(exc.field, exc.message) from None
        if resp.decision == common_pb2.DECISION_DENY:
            raise _denial(resp)
        decision = common_pb2.Decision.Name(resp.decision).removeprefix("DECISION_")
        cost = resp.estimated_cost.units * 1_000_000_000 + resp.estimated_cost.nanos
        ok = external_auth_pb2.OkHttpResponse(headers=[
            _header("x-p402-reservation-id", resp.reservation_id),
            _header("x-p402-decision", decision),
            _header("x-p402-output-token-cap", str(resp.output_token_cap)),
        ])
        if self.config.strip_authorization:
            ok.headers_to_remove.append("authorization")
        out = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
        out.dynamic_metadata.update({
            "decision": decision, "reservation_id": resp.reservation_id,
            "reasons": ",".join(resp.reasons), "estimated_cost_nanos": str(cost),
            "output_token_cap": str(resp.output_token_cap), "model": resp.model})
        return out


def add_to_server(server, runtime, auth, config: EnvoyConfig | None = None) -> None:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        ExtAuthzService(runtime, auth, config), server)


__all__ = ["EnvoyConfig", "ExtAuthzService", "add_to_server", "authorize_request",
           "SERVICE_NAME"]

"""P402Client and AsyncP402Client: the Python SDK over the p402.v1 gRPC services.

This module owns the call discipline shared by both clients: the API key as
`authorization: Bearer …` metadata, a deadline on every call, retries with jittered
exponential backoff on UNAVAILABLE and DEADLINE_EXCEEDED for idempotent calls only,
and the mapping of failures to `p402_client.errors`. Building requests and reading
responses lives in `_convert`, so the sync and async clients differ only in how
they wait.

Idempotency, which is what makes a retry safe:
- Record: the client makes the event id (a ULID) before the first attempt when the
  caller gives none, so a retried Record is answered with the first result.
- Authorize: when retries are on and no reservation id is given, the client makes
  one before the first attempt; a retried Authorize then finds its own reservation
  instead of holding the budget twice.
- Release (by reservation id), reads, Put*/Delete*/settings/prices: idempotent by
  nature. CreateKey is never retried: a lost answer would leave a live key nobody
  has seen (it carries a request_id for servers that deduplicate).

One room, though long: the sync and async clients are the same surface twice, kept
method beside method so they cannot drift; request building and response reading are
in `_convert`, the meter and recorder in their own modules.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)

import grpc

from p402.v1 import admin_pb2, admin_pb2_grpc, meter_pb2, meter_pb2_grpc

from . import _convert as cv
from .errors import InvalidArgument, from_rpc_error
from .ids import new_ulid
from .signing import GatewaySigner
from .types import (
    ApiKey,
    Authorization,
    Budget,
    CreatedKey,
    Event,
    Gateway,
    Page,
    Ping,
    PolicyRule,
    Price,
    PriceImport,
    RecordResult,
    RegisteredGateway,
    ReleaseResult,
    Scope,
    Settings,
    SpendRow,
)

if TYPE_CHECKING:  # pragma: no cover
    from .meter import AsyncMeter, Meter

__version__ = "0.1.0"

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# gRPC's own reconnect backoff starts at 1 s: a client created before its server is
# up would fail every retry inside that second. Start reconnecting fast instead.
_CHANNEL_OPTIONS = (
    ("grpc.primary_user_agent", f"p402-python/{__version__}"),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Each client has its own connection: gRPC Python otherwise shares one TCP
    # connection between the channels of a process, so several clients would all
    # reach one worker of `p402 serve --workers N` (SO_REUSEPORT spreads
    # connections, not calls).
    ("grpc.use_local_subchannel_pool", 1),
)


class _Common:
    """Configuration and request building shared by the sync and async clients."""

    def __init__(self, target: str, api_key: str | None = None, *, timeout: float = 5.0,
                 retries: int = 3, backoff: float = 0.1, max_backoff: float = 2.0,
                 stream_timeout: float | None = 600.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 interceptors: Sequence[Any] = (), fail_open: bool = False,
                 gateway_id: str | None = None, gateway_secret: str | bytes | None = None,
                 signer: GatewaySigner | None = None):
        if not isinstance(target, str) or not target:
            raise InvalidArgument("target", "is required (HOST:PORT)")
        api_key = os.environ.get("P402_API_KEY", "") if api_key is None else api_key
        # A key read from a file or pasted often ends in a newline: gRPC metadata
        # refuses it with a core trace, so it is stripped here; anything else that
        # is not a printable, space-free character is refused by name.
        api_key = api_key.strip() if isinstance(api_key, str) else api_key
        if not isinstance(api_key, str) or not api_key:
            raise InvalidArgument("api_key", "is required (or set P402_API_KEY)")
        if any(c.isspace() or not c.isprintable() for c in api_key):
            raise InvalidArgument("api_key", "contains whitespace or control characters")
        if not timeout or timeout <= 0:
            raise InvalidArgument("timeout", "must be > 0 seconds")
        cv.check_int("retries", retries)
        self.target = target
        self.timeout = float(timeout)
        self.retries = retries
        self.stream_timeout = stream_timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._credentials = credentials
        self._options = list(_CHANNEL_OPTIONS) + list(options)
        self._interceptors = list(interceptors)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        # The metering helpers' default when P402 cannot be reached (see
        # p402_client.meter): False = fail-closed. authorize()/record() themselves
        # always raise; only meter(), wrap_openai() and the integrations read this.
        self.fail_open = bool(fail_open)
        # Signed reports (privacy mode private_gateway; p402_client.signing): every
        # Record and RecordBatch, each attempt signed afresh.
        if signer is not None and (gateway_id or gateway_secret):
            raise InvalidArgument("signer", "give a signer or gateway_id and "
                                            "gateway_secret, not both")
        if signer is None and (gateway_id or gateway_secret):
            if not gateway_secret:
                raise InvalidArgument("gateway_secret", "is required with gateway_id")
            signer = GatewaySigner(gateway_id or "", gateway_secret)
        if signer is not None and not isinstance(signer, GatewaySigner):
            raise InvalidArgument("signer", f"must be a GatewaySigner, got "
                                            f"{type(signer).__name__}")
        self.signer: GatewaySigner | None = signer

    def _call_metadata(self, method: Callable, request: Any) -> tuple:
        """The call's metadata: the API key, plus the signature of a Record or
        RecordBatch when the client signs (fresh per attempt: nonces are single-use)."""
        if self.signer is not None:
            if method is self._meter.Record:
                return self._metadata + self.signer.metadata("Record", request)
            if method is self._meter.RecordBatch:
                return self._metadata + self.signer.metadata("RecordBatch", request)
        return self._metadata

    def _delay(self, attempt: int) -> float:
        # Full jitter (AWS architecture blog): spreads retries of many gateways.
        return random.uniform(0, min(self._max_backoff, self._backoff * (2 ** attempt)))

    # -- request builders (pure; shared) -------------------------------------------

    def _authorize_req(self, model: str, kw: dict[str, Any]) -> meter_pb2.AuthorizeRequest:
        if not kw.get("reservation_id") and self.retries > 0:
            kw["reservation_id"] = new_ulid()
        return cv.authorize_request(model, **kw)

    @staticmethod
    def _record_req(reservation_id: str, kw: dict[str, Any], prefix: str = ""
                    ) -> meter_pb2.RecordRequest:
        unknown = sorted(set(kw) - cv.RECORD_FIELDS)
        if unknown:
            raise InvalidArgument(prefix + unknown[0], "unknown record field")
        if not kw.get("event_id"):
            kw["event_id"] = new_ulid()
        return cv.record_request(reservation_id, prefix=prefix, **kw)

    def _batch_req(self, records: Iterable[Mapping[str, Any]]) -> meter_pb2.RecordBatchRequest:
        reqs = []
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping):
                raise InvalidArgument(f"records[{i}]", "must be a mapping of record fields")
            kw = dict(rec)
            reqs.append(self._record_req(kw.pop("reservation_id", ""), kw,
                                         prefix=f"records[{i}]."))
        return meter_pb2.RecordBatchRequest(records=reqs)

    @staticmethod
    def _query_req(filters: dict[str, Any], group_by: Any, page_size: int,
                   page_token: str) -> meter_pb2.QueryRequest:
        return meter_pb2.QueryRequest(filter=cv.event_filter(**filters),
                                      group_by=cv.check_strs("group_by", group_by),
                                      **cv.page_args(page_size, page_token))

    @staticmethod
    def _query_page(resp: meter_pb2.QueryResponse, grouped: bool) -> Page:
        items: tuple = (tuple(cv.spend_row(r) for r in resp.rows) if grouped
                        else tuple(cv.event(e) for e in resp.events))
        return Page(items, resp.next_page_token)

    @staticmethod
    def _create_key_req(name: str, scopes: Any) -> admin_pb2.CreateKeyRequest:
        nums = cv.check_enums("scopes", Scope, scopes)
        if not nums:
            raise InvalidArgument("scopes", "at least one of meter, read, admin")
        return admin_pb2.CreateKeyRequest(name=cv.check_str("name", name), scopes=nums,
                                          request_id=new_ulid())

    @staticmethod
    def _register_gateway_req(gateway_id: str, name: str
                              ) -> admin_pb2.RegisterGatewayRequest:
        return admin_pb2.RegisterGatewayRequest(
            gateway_id=cv.check_str("gateway_id", gateway_id),
            name=cv.check_str("name", name), request_id=new_ulid())

    @staticmethod
    def _import_req(data: Any, format: str) -> admin_pb2.ImportPricesRequest:
        if isinstance(data, os.PathLike):
            with open(data, "rb") as fh:
                data = fh.read()
        elif isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, (bytes, bytearray)):
            raise InvalidArgument("data", "must be bytes, str or a path")
        return admin_pb2.ImportPricesRequest(format=cv.check_str("format", format,
                                                                  required=True),
                                             data=bytes(data))


class P402Client(_Common):
    """Blocking client. Use as a context manager, or call close().

    >>> with P402Client("127.0.0.1:4020", api_key="p402_…") as p402:
    ...     auth = p402.authorize("gpt-4o-mini", owners={"customer": "acme"},
    ...                           input_bytes=1200, max_output_tokens=256)
    ...     if auth.allowed:
    ...         p402.record(auth.reservation_id, input_tokens=300, output_tokens=120)

    A tenant's own gateway (privacy mode private_gateway) signs its reports: pass
    `gateway_id=` and `gateway_secret=` (from `register_gateway`), or a
    `signer=GatewaySigner(...)`; every Record and RecordBatch is then signed and,
    once verified, committed with evidence ATTESTED (p402_client.signing).
    """

    def __init__(self, target: str, api_key: str | None = None, **kw: Any):
        super().__init__(target, api_key, **kw)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(target, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(target, self._options)
        if self._interceptors:  # tracing, metrics, custom auth: grpc's own hooks
            self._channel = grpc.intercept_channel(self._channel, *self._interceptors)
        self._meter = meter_pb2_grpc.MeterServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "P402Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Callable, request: Any, *, idempotent: bool = True) -> Any:
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout,
                              metadata=self._call_metadata(method, request))
            except grpc.RpcError as err:
                if idempotent and attempt < self.retries and err.code() in RETRYABLE:
                    time.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise from_rpc_error(err) from None

    # -- meter ---------------------------------------------------------------------

    def authorize(self, model: str, **kw: Any) -> Authorization:
        """May these owners spend on this model? Reserves the estimate unless DENY.

        Keywords: provider, owners (dict or Owners), labels, input_bytes, content,
        max_output_tokens, privacy_mode, reservation_id, ttl_seconds, attempt,
        retry_of. A DENY is a decision (`auth.denied`), not an exception.
        """
        return cv.authorization(self._call(self._meter.Authorize,
                                           self._authorize_req(model, kw)))

    def record(self, reservation_id: str = "", **kw: Any) -> RecordResult:
        """Settle a reservation (or meter a call that had none, with model=…).

        Usage as keyword ints (input_tokens, output_tokens, cached_input_tokens,
        cache_write_tokens, reasoning_tokens); outcome as Outcome or str;
        revenue_nanos; event_id (a ULID is made when absent, so retries are safe);
        usage_estimated=True when the usage is an estimate, not the provider's
        report (evidence ESTIMATED). Returns once the event is durably committed.
        Signed (x-p402-signature) when the client has a gateway signer.

        Name the call too (model=, owners=, and provider=, labels= if Authorize had
        them), as `meter` does: a hold made just before the server crashed may be
        gone, and a Record naming only its reservation is then refused (NotFound)
        where a named one is metered at its usage (reason reservation.unknown).
        """
        return cv.record_result(self._call(self._meter.Record,
                                           self._record_req(reservation_id, kw)))

    def record_batch(self, records: Iterable[Mapping[str, Any]]) -> list[RecordResult]:
        """Many records (dicts of record() keywords) in one call, results in order."""
        resp = self._call(self._meter.RecordBatch, self._batch_req(records))
        return [cv.record_result(r) for r in resp.results]

    def release(self, reservation_id: str) -> ReleaseResult:
        """Void a reservation whose call was never made."""
        req = meter_pb2.ReleaseRequest(
            reservation_id=cv.check_str("reservation_id", reservation_id, required=True))
        return cv.release_result(self._call(self._meter.Release, req))

    def query(self, *, group_by: Any = (), page_size: int = 0, page_token: str = "",
              **filters: Any) -> Page:
        """One page of events (newest first) or, with group_by, of SpendRows.

        Filters: since, until (int ms, datetime, or timedelta ago), owners, labels,
        models, providers, outcomes, decisions, evidences.
        """
        resp = self._call(self._meter.Query,
                          self._query_req(filters, group_by, page_size, page_token))
        return self._query_page(resp, bool(group_by))

    def iter_query(self, *, group_by: Any = (), page_size: int = 0,
                   **filters: Any) -> Iterator[Event | SpendRow]:
        """Every item of query(...), fetching the pages as it goes."""
        token = ""
        while True:
            page = self.query(group_by=group_by, page_size=page_size, page_token=token,
                              **filters)
            yield from page.items
            if page.last:
                return
            token = page.next_page_token

    def export(self, **filters: Any) -> Iterator[Event]:
        """Every event matching the filters (query()'s), in ledger order, streamed."""
        req = meter_pb2.ExportEventsRequest(filter=cv.event_filter(**filters))
        attempt = 0
        while True:
            received = False
            call = self._meter.ExportEvents(req, timeout=self.stream_timeout,
                                            metadata=self._metadata)
            try:
                for pb in call:
                    received = True
                    yield cv.event(pb)
                return
            except grpc.RpcError as err:
                # Only a stream that has not started yet can be retried transparently.
                if (not received and attempt < self.retries
                        and err.code() in RETRYABLE):
                    time.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise from_rpc_error(err) from None
            finally:
                call.cancel()  # a consumer that stops early frees the stream now

    def meter(self, model: str, **kw: Any) -> "Meter":
        """One metered call as a context manager: authorize on enter, record (or
        release) on exit. See `p402_client.meter` for the exact rule.

        >>> with p402.meter("gpt-4o-mini", owners={"customer": "acme"}) as m:
        ...     reply = call_provider(max_tokens=m.output_token_cap)
        ...     m.set_usage(input_tokens=310, output_tokens=118)
        """
        from .meter import Meter

        return Meter(self, model, **kw)

    def ping(self) -> Ping:
        """Authenticated no-op: the key's tenant and the server's core implementation."""
        return cv.ping(self._call(self._meter.Ping, meter_pb2.PingRequest()))

    def get_receipt(self, event_id: str) -> str:
        """The signed receipt of a committed event (canonical JSON text; anyone checks
        it offline with evidence_keys(): `p402 receipts verify`)."""
        req = meter_pb2.GetReceiptRequest(
            event_id=cv.check_str("event_id", event_id, required=True))
        return self._call(self._meter.GetReceipt, req).receipt

    def evidence_keys(self) -> dict:
        """The tenant's published evidence key set (JSON Web Keys; the active key
        first, then the retired ones, which still verify what they signed)."""
        import json

        return json.loads(self._call(self._admin.GetEvidenceKeys,
                                     admin_pb2.GetEvidenceKeysRequest()).key_set_json)

    def put_price_book(self, document: Mapping[str, Any]) -> dict:
        """Replace the tenant's price book (admin; {} removes it): {"document", "version"}."""
        import json

        resp = self._call(self._admin.PutPriceBook, admin_pb2.PriceBook(
            document_json=json.dumps(dict(document))), idempotent=False)
        return {"document": json.loads(resp.document_json), "version": resp.version}

    def get_price_book(self) -> dict:
        """The tenant's price book: {"document", "version"} ({} and "" when none)."""
        import json

        resp = self._call(self._admin.GetPriceBook, admin_pb2.GetPriceBookRequest())
        return {"document": json.loads(resp.document_json), "version": resp.version}

    def close_statements(self, period: str, customer: str | None = None) -> list[dict]:
        """Close `period` ("YYYY-MM") for `customer`, or for every customer with spend
        (None): the signed statements (dicts; closing again returns the same ones)."""
        import json

        req = (admin_pb2.CloseStatementsRequest(period=period, every_customer=True)
               if customer is None else
               admin_pb2.CloseStatementsRequest(period=period,
                                                customer=cv.check_str("customer", customer)))
        resp = self._call(self._admin.CloseStatements, req)
        return [json.loads(x.document_json) for x in resp.statements]

    def get_statement(self, period: str, customer: str) -> dict:
        import json

        resp = self._call(self._admin.GetStatement, admin_pb2.GetStatementRequest(
            period=period, customer=cv.check_str("customer", customer)))
        return json.loads(resp.document_json)

    def verify_statement(self, document: str | Mapping[str, Any]) -> dict:
        """A statement checked against the ledger and its signature, server-side:
        {"ok", "reason", "differences"}."""
        import json

        text = document if isinstance(document, str) else json.dumps(dict(document))
        resp = self._call(self._admin.VerifyStatement,
                          admin_pb2.Statement(document_json=text))
        return {"ok": resp.ok, "reason": resp.reason, "differences": list(resp.differences)}

    def rotate_evidence_key(self) -> dict:
        """A new active evidence key (admin); returns the new key set."""
        import json

        return json.loads(self._call(self._admin.RotateEvidenceKey,
                                     admin_pb2.RotateEvidenceKeyRequest(),
                                     idempotent=False).key_set_json)

    # -- admin ---------------------------------------------------------------------

    def create_key(self, name: str = "", scopes: Any = ("meter",)) -> CreatedKey:
        """A new key; `.api_key` is the secret, returned this once."""
        return cv.created_key(self._call(self._admin.CreateKey,
                                         self._create_key_req(name, scopes),
                                         idempotent=False))

    def list_keys(self, *, page_size: int = 0, page_token: str = "") -> Page[ApiKey]:
        resp = self._call(self._admin.ListKeys,
                          admin_pb2.ListKeysRequest(**cv.page_args(page_size, page_token)))
        return Page(tuple(cv.api_key(k) for k in resp.keys), resp.next_page_token)

    def revoke_key(self, key_id: str) -> ApiKey:
        req = admin_pb2.RevokeKeyRequest(key_id=cv.check_str("key_id", key_id,
                                                              required=True))
        return cv.api_key(self._call(self._admin.RevokeKey, req).key)

    def register_gateway(self, gateway_id: str = "", *, name: str = ""
                         ) -> RegisteredGateway:
        """A gateway that signs its reports (private_gateway); `.secret` (hex) is
        returned this once. Empty `gateway_id`: the server assigns one. Retried
        safely (the request_id makes the server answer a retry with the first
        result, the same secret)."""
        return cv.registered_gateway(self._call(self._admin.RegisterGateway,
                                                self._register_gateway_req(gateway_id,
                                                                           name)))

    def list_gateways(self, *, page_size: int = 0, page_token: str = ""
                      ) -> Page[Gateway]:
        resp = self._call(self._admin.ListGateways, admin_pb2.ListGatewaysRequest(
            **cv.page_args(page_size, page_token)))
        return Page(tuple(cv.gateway(g) for g in resp.gateways), resp.next_page_token)

    def revoke_gateway(self, gateway_id: str) -> Gateway:
        """Its reports are refused from now on (GATEWAY_UNKNOWN)."""
        req = admin_pb2.RevokeGatewayRequest(
            gateway_id=cv.check_str("gateway_id", gateway_id, required=True))
        return cv.gateway(self._call(self._admin.RevokeGateway, req))

    def put_budget(self, budget_id: str, *, limit_nanos: int, **kw: Any) -> Budget:
        """Create or replace a budget. Keywords: period, soft_limit_nanos,
        enforcement, scope ({dimension or "label.<key>": value})."""
        req = admin_pb2.PutBudgetRequest(budget=cv.budget_pb(budget_id,
                                                             limit_nanos=limit_nanos, **kw),
                                         request_id=new_ulid())
        return cv.budget(self._call(self._admin.PutBudget, req))

    def list_budgets(self, *, page_size: int = 0, page_token: str = "") -> Page[Budget]:
        resp = self._call(self._admin.ListBudgets,
                          admin_pb2.ListBudgetsRequest(**cv.page_args(page_size,
                                                                      page_token)))
        return Page(tuple(cv.budget(b) for b in resp.budgets), resp.next_page_token)

    def delete_budget(self, budget_id: str) -> None:
        self._call(self._admin.DeleteBudget, admin_pb2.DeleteBudgetRequest(
            budget_id=cv.check_str("budget_id", budget_id, required=True)))

    def put_policy_rule(self, rule_id: str, effect: Any, **kw: Any) -> PolicyRule:
        """Create or replace a rule; keywords are PolicyRule's fields."""
        req = admin_pb2.PutPolicyRuleRequest(rule=cv.policy_rule_pb(rule_id, effect, **kw),
                                             request_id=new_ulid())
        return cv.policy_rule(self._call(self._admin.PutPolicyRule, req))

    def list_policy_rules(self, *, page_size: int = 0, page_token: str = ""
                          ) -> Page[PolicyRule]:
        resp = self._call(self._admin.ListPolicyRules,
                          admin_pb2.ListPolicyRulesRequest(**cv.page_args(page_size,
                                                                          page_token)))
        return Page(tuple(cv.policy_rule(r) for r in resp.rules), resp.next_page_token)

    def delete_policy_rule(self, rule_id: str) -> None:
        self._call(self._admin.DeletePolicyRule, admin_pb2.DeletePolicyRuleRequest(
            rule_id=cv.check_str("rule_id", rule_id, required=True)))

    def import_prices(self, data: Any, *, format: str = "litellm") -> PriceImport:
        """Tenant price overrides from a price map (bytes, str or a path)."""
        return cv.price_import(self._call(self._admin.ImportPrices,
                                          self._import_req(data, format)))

    def list_prices(self, model_filter: str = "", *, page_size: int = 0,
                    page_token: str = "") -> Page[Price]:
        req = admin_pb2.ListPricesRequest(model_filter=cv.check_str("model_filter",
                                                                    model_filter),
                                          **cv.page_args(page_size, page_token))
        resp = self._call(self._admin.ListPrices, req)
        return Page(tuple(cv.price(p) for p in resp.prices), resp.next_page_token,
                    resp.catalog_version)

    def get_settings(self) -> Settings:
        return cv.settings(self._call(self._admin.GetSettings,
                                      admin_pb2.GetSettingsRequest()))

    def update_settings(self, **fields: Any) -> Settings:
        """Change exactly the given settings (Settings' field names)."""
        return cv.settings(self._call(self._admin.UpdateSettings,
                                      cv.settings_update(fields)))

    def paginate(self, method: Callable[..., Page], **kw: Any) -> Iterator[Any]:
        """Every item of a paginated list method: `paginate(p402.list_keys)`."""
        token = ""
        while True:
            page = method(page_token=token, **kw)
            yield from page.items
            if page.last:
                return
            token = page.next_page_token


class AsyncP402Client(_Common):
    """asyncio client (grpc.aio) with the same methods as P402Client, awaitable.

    >>> async with AsyncP402Client("127.0.0.1:4020", api_key="p402_…") as p402:
    ...     auth = await p402.authorize("gpt-4o-mini", owners={"customer": "acme"})
    """

    def __init__(self, target: str, api_key: str | None = None, **kw: Any):
        super().__init__(target, api_key, **kw)
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self._credentials,
                                                    self._options,
                                                    interceptors=self._interceptors or None)
        else:
            self._channel = grpc.aio.insecure_channel(
                target, self._options, interceptors=self._interceptors or None)
        self._meter = meter_pb2_grpc.MeterServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncP402Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _call(self, method: Callable, request: Any, *, idempotent: bool = True
                    ) -> Any:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.timeout,
                                    metadata=self._call_metadata(method, request))
            except grpc.RpcError as err:
                if idempotent and attempt < self.retries and err.code() in RETRYABLE:
                    await asyncio.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise from_rpc_error(err) from None

    # -- meter ---------------------------------------------------------------------

    async def authorize(self, model: str, **kw: Any) -> Authorization:
        """See P402Client.authorize."""
        return cv.authorization(await self._call(self._meter.Authorize,
                                                 self._authorize_req(model, kw)))

    async def record(self, reservation_id: str = "", **kw: Any) -> RecordResult:
        """See P402Client.record."""
        return cv.record_result(await self._call(self._meter.Record,
                                                 self._record_req(reservation_id, kw)))

    async def record_batch(self, records: Iterable[Mapping[str, Any]]
                           ) -> list[RecordResult]:
        resp = await self._call(self._meter.RecordBatch, self._batch_req(records))
        return [cv.record_result(r) for r in resp.results]

    async def release(self, reservation_id: str) -> ReleaseResult:
        req = meter_pb2.ReleaseRequest(
            reservation_id=cv.check_str("reservation_id", reservation_id, required=True))
        return cv.release_result(await self._call(self._meter.Release, req))

    async def query(self, *, group_by: Any = (), page_size: int = 0,
                    page_token: str = "", **filters: Any) -> Page:
        resp = await self._call(self._meter.Query,
                                self._query_req(filters, group_by, page_size, page_token))
        return self._query_page(resp, bool(group_by))

    async def iter_query(self, *, group_by: Any = (), page_size: int = 0,
                         **filters: Any) -> AsyncIterator[Event | SpendRow]:
        token = ""
        while True:
            page = await self.query(group_by=group_by, page_size=page_size,
                                    page_token=token, **filters)
            for item in page.items:
                yield item
            if page.last:
                return
            token = page.next_page_token

    async def export(self, **filters: Any) -> AsyncIterator[Event]:
        req = meter_pb2.ExportEventsRequest(filter=cv.event_filter(**filters))
        attempt = 0
        while True:
            received = False
            call = self._meter.ExportEvents(req, timeout=self.stream_timeout,
                                            metadata=self._metadata)
            try:
                async for pb in call:
                    received = True
                    yield cv.event(pb)
                return
            except grpc.RpcError as err:
                if (not received and attempt < self.retries
                        and err.code() in RETRYABLE):
                    await asyncio.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise from_rpc_error(err) from None
            finally:
                call.cancel()  # a consumer that stops early frees the stream now

    def meter(self, model: str, **kw: Any) -> "AsyncMeter":
        """See P402Client.meter; use with `async with`."""
        from .meter import AsyncMeter

        return AsyncMeter(self, model, **kw)

    async def ping(self) -> Ping:
        return cv.ping(await self._call(self._meter.Ping, meter_pb2.PingRequest()))

    async def get_receipt(self, event_id: str) -> str:
        req = meter_pb2.GetReceiptRequest(
            event_id=cv.check_str("event_id", event_id, required=True))
        return (await self._call(self._meter.GetReceipt, req)).receipt

    async def evidence_keys(self) -> dict:
        import json

        return json.loads((await self._call(self._admin.GetEvidenceKeys,
                                            admin_pb2.GetEvidenceKeysRequest())).key_set_json)

    async def rotate_evidence_key(self) -> dict:
        import json

        return json.loads((await self._call(self._admin.RotateEvidenceKey,
                                            admin_pb2.RotateEvidenceKeyRequest(),
                                            idempotent=False)).key_set_json)

    # -- admin ---------------------------------------------------------------------

    async def create_key(self, name: str = "", scopes: Any = ("meter",)) -> CreatedKey:
        return cv.created_key(await self._call(self._admin.CreateKey,
                                               self._create_key_req(name, scopes),
                                               idempotent=False))

    async def list_keys(self, *, page_size: int = 0, page_token: str = ""
                        ) -> Page[ApiKey]:
        resp = await self._call(self._admin.ListKeys, admin_pb2.ListKeysRequest(
            **cv.page_args(page_size, page_token)))
        return Page(tuple(cv.api_key(k) for k in resp.keys), resp.next_page_token)

    async def revoke_key(self, key_id: str) -> ApiKey:
        req = admin_pb2.RevokeKeyRequest(key_id=cv.check_str("key_id", key_id,
                                                              required=True))
        return cv.api_key((await self._call(self._admin.RevokeKey, req)).key)

    async def register_gateway(self, gateway_id: str = "", *, name: str = ""
                               ) -> RegisteredGateway:
        """See P402Client.register_gateway."""
        return cv.registered_gateway(await self._call(
            self._admin.RegisterGateway, self._register_gateway_req(gateway_id, name)))

    async def list_gateways(self, *, page_size: int = 0, page_token: str = ""
                            ) -> Page[Gateway]:
        resp = await self._call(self._admin.ListGateways, admin_pb2.ListGatewaysRequest(
            **cv.page_args(page_size, page_token)))
        return Page(tuple(cv.gateway(g) for g in resp.gateways), resp.next_page_token)

    async def revoke_gateway(self, gateway_id: str) -> Gateway:
        req = admin_pb2.RevokeGatewayRequest(
            gateway_id=cv.check_str("gateway_id", gateway_id, required=True))
        return cv.gateway(await self._call(self._admin.RevokeGateway, req))

    async def put_budget(self, budget_id: str, *, limit_nanos: int, **kw: Any) -> Budget:
        req = admin_pb2.PutBudgetRequest(budget=cv.budget_pb(budget_id,
                                                             limit_nanos=limit_nanos, **kw),
                                         request_id=new_ulid())
        return cv.budget(await self._call(self._admin.PutBudget, req))

    async def list_budgets(self, *, page_size: int = 0, page_token: str = ""
                           ) -> Page[Budget]:
        resp = await self._call(self._admin.ListBudgets, admin_pb2.ListBudgetsRequest(
            **cv.page_args(page_size, page_token)))
        return Page(tuple(cv.budget(b) for b in resp.budgets), resp.next_page_token)

    async def delete_budget(self, budget_id: str) -> None:
        await self._call(self._admin.DeleteBudget, admin_pb2.DeleteBudgetRequest(
            budget_id=cv.check_str("budget_id", budget_id, required=True)))

    async def put_policy_rule(self, rule_id: str, effect: Any, **kw: Any) -> PolicyRule:
        req = admin_pb2.PutPolicyRuleRequest(rule=cv.policy_rule_pb(rule_id, effect, **kw),
                                             request_id=new_ulid())
        return cv.policy_rule(await self._call(self._admin.PutPolicyRule, req))

    async def list_policy_rules(self, *, page_size: int = 0, page_token: str = ""
                                ) -> Page[PolicyRule]:
        resp = await self._call(self._admin.ListPolicyRules,
                                admin_pb2.ListPolicyRulesRequest(
                                    **cv.page_args(page_size, page_token)))
        return Page(tuple(cv.policy_rule(r) for r in resp.rules), resp.next_page_token)

    async def delete_policy_rule(self, rule_id: str) -> None:
        await self._call(self._admin.DeletePolicyRule, admin_pb2.DeletePolicyRuleRequest(
            rule_id=cv.check_str("rule_id", rule_id, required=True)))

    async def import_prices(self, data: Any, *, format: str = "litellm") -> PriceImport:
        return cv.price_import(await self._call(self._admin.ImportPrices,
                                                self._import_req(data, format)))

    async def list_prices(self, model_filter: str = "", *, page_size: int = 0,
                          page_token: str = "") -> Page[Price]:
        req = admin_pb2.ListPricesRequest(model_filter=cv.check_str("model_filter",
                                                                    model_filter),
                                          **cv.page_args(page_size, page_token))
        resp = await self._call(self._admin.ListPrices, req)
        return Page(tuple(cv.price(p) for p in resp.prices), resp.next_page_token,
                    resp.catalog_version)

    async def get_settings(self) -> Settings:
        return cv.settings(await self._call(self._admin.GetSettings,
                                            admin_pb2.GetSettingsRequest()))

    async def update_settings(self, **fields: Any) -> Settings:
        return cv.settings(await self._call(self._admin.UpdateSettings,
                                            cv.settings_update(fields)))

    async def paginate(self, method: Callable[..., Any], **kw: Any) -> AsyncIterator[Any]:
        token = ""
        while True:
            page = await method(page_token=token, **kw)
            for item in page.items:
                yield item
            if page.last:
                return
            token = page.next_page_token


__all__ = ["P402Client", "AsyncP402Client", "RETRYABLE"]

"""AdminService servicer: a tenant's API keys, budgets, policy rules, prices, settings.

Owns the wire-level behaviour of p402.v1.AdminService. Every change is persisted to
the store first, then applied to the tenant's engine atomically (runtime/tenant.py swaps
budgets, rules, catalog or settings under the tenant's admin lock, so concurrent
admin calls apply in the order they were persisted). Reads (ListBudgets,
ListPolicyRules, ListPrices, GetSettings) need scope read; everything else admin.
"""
from __future__ import annotations

import json
import logging
import time

from p402.v1 import admin_pb2, admin_pb2_grpc
from p402_server.api.auth import ADMIN, READ, KeyCache
from p402_server.privacy import modes as _privacy
from p402_server.privacy import signing
from p402_server.runtime.process import Runtime
from p402_server.runtime.shared import _LRU, new_ulid
from p402_server.wire import convert
from p402_server.wire.errors import not_found, unary
from p402core import Conflict, InvalidArgument

log = logging.getLogger("p402.server.admin")

MAX_IMPORT_BYTES = 64 * 1024 * 1024


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, runtime: Runtime, auth: KeyCache):
        self.runtime = runtime
        self.store = runtime.store
        self.auth = auth
        # (tenant, request_id) -> response of a mutating call, for idempotent retries.
        self._requests = _LRU(10_000)

    async def _rt(self, key):
        return self.runtime.tenants.get(key.tenant_id) or await self.runtime.get(key.tenant_id)

    def _replayed(self, key, method: str, request_id: str):
        convert.check_str(request_id, "request_id")
        if not request_id:
            return None
        return self._requests.get((key.tenant_id, method, request_id))

    def _remember(self, key, method: str, request_id: str, response) -> None:
        if request_id:
            self._requests.put((key.tenant_id, method, request_id), response)

    # --- keys ------------------------------------------------------------------

    @unary(ADMIN)
    async def CreateKey(self, request, context, key):
        prior = self._replayed(key, "CreateKey", request.request_id)
        if prior is not None:
            return prior
        convert.check_str(request.name, "name")
        scopes = convert.scopes_from_proto(request.scopes)
        info, plaintext = await self.store.create_key(key.tenant_id, sorted(scopes),
                                                      request.name)
        resp = admin_pb2.CreateKeyResponse(key=convert.key_to_proto(info), api_key=plaintext)
        self._remember(key, "CreateKey", request.request_id, resp)
        log.info("tenant %s: key %s created (%s)", key.tenant_id, info.key_id,
                 ",".join(sorted(scopes)))
        return resp

    @unary(ADMIN)
    async def ListKeys(self, request, context, key):
        keys = sorted(await self.store.list_keys(key.tenant_id),
                      key=lambda k: (k.created_ms, k.key_id))
        page, token = convert.offset_page(keys, request.page_size, request.page_token)
        resp = admin_pb2.ListKeysResponse(next_page_token=token)
        for k in page:
            convert.key_to_proto(k, resp.keys.add())
        return resp

    @unary(ADMIN)
    async def RevokeKey(self, request, context, key):
        key_id = convert.check_str(request.key_id, "key_id", required=True)
        if not await self.store.revoke_key(key.tenant_id, key_id):
            raise not_found("key_id", "api key", key_id)
        self.auth.revoke(key_id)  # the next call with it fails, on this server at once
        info = next((k for k in await self.store.list_keys(key.tenant_id)
                     if k.key_id == key_id), None)
        log.info("tenant %s: key %s revoked", key.tenant_id, key_id)
        resp = admin_pb2.RevokeKeyResponse()
        if info is not None:
            convert.key_to_proto(info, resp.key)
        return resp

    # --- budgets ---------------------------------------------------------------

    @unary(ADMIN)
    async def PutBudget(self, request, context, key):
        if not request.HasField("budget"):
            raise InvalidArgument("budget", "is required")
        rt = await self._rt(key)
        budget = convert.budget_from_proto(request.budget, rt.core)
        async with rt.admin_lock:
            await self.store.put_budget(key.tenant_id, budget.budget_id, budget.to_dict())
            # Mid-period: start from the spend already in the ledger for its scope.
            await rt.open_budget(budget)
            committed = ({} if budget.budget_id in rt.budgets
                         else await rt.ledger_committed((budget,)))
            budgets = dict(rt.budgets)
            budgets[budget.budget_id] = budget
            rt.swap_budgets(budgets)
            rt.set_ledger_committed(committed)
        return convert.budget_to_proto(budget, self._status(rt, budget.budget_id))

    @unary(READ)
    async def ListBudgets(self, request, context, key):
        rt = await self._rt(key)
        budgets = [rt.budgets[k] for k in sorted(rt.budgets)]
        page, token = convert.offset_page(budgets, request.page_size, request.page_token)
        statuses = {s.budget_id: s for s in rt.budget_status()}
        resp = admin_pb2.ListBudgetsResponse(next_page_token=token)
        for b in page:
            convert.budget_to_proto(b, statuses.get(b.budget_id), resp.budgets.add())
        return resp

    @unary(ADMIN)
    async def DeleteBudget(self, request, context, key):
        budget_id = convert.check_str(request.budget_id, "budget_id", required=True)
        rt = await self._rt(key)
        async with rt.admin_lock:
            if not await self.store.delete_budget(key.tenant_id, budget_id):
                raise not_found("budget_id", "budget", budget_id)
            budgets = dict(rt.budgets)
            budgets.pop(budget_id, None)
            rt.swap_budgets(budgets)
        return admin_pb2.DeleteBudgetResponse()

    @staticmethod
    def _status(rt, budget_id: str):
        return next(iter(rt.budget_status((budget_id,))), None)

    # --- policy rules ----------------------------------------------------------

    @unary(ADMIN)
    async def PutPolicyRule(self, request, context, key):
        if not request.HasField("rule"):
            raise InvalidArgument("rule", "is required")
        rt = await self._rt(key)
        rule = convert.rule_from_proto(request.rule, rt.core)
        async with rt.admin_lock:
            rules = dict(rt.rules)
            rules[rule.rule_id] = rule
            await self.store.put_policy(key.tenant_id, rule.rule_id, rule.to_dict())
            rt.swap_rules(rules)
        return convert.rule_to_proto(rule)

    @unary(READ)
    async def ListPolicyRules(self, request, context, key):
        rt = await self._rt(key)
        rules = [rt.rules[k] for k in sorted(rt.rules)]
        page, token = convert.offset_page(rules, request.page_size, request.page_token)
        resp = admin_pb2.ListPolicyRulesResponse(next_page_token=token)
        for r in page:
            convert.rule_to_proto(r, resp.rules.add())
        return resp

    @unary(ADMIN)
    async def DeletePolicyRule(self, request, context, key):
        rule_id = convert.check_str(request.rule_id, "rule_id", required=True)
        rt = await self._rt(key)
        async with rt.admin_lock:
            if not await self.store.delete_policy(key.tenant_id, rule_id):
                raise not_found("rule_id", "policy rule", rule_id)
            rules = dict(rt.rules)
            rules.pop(rule_id, None)
            rt.swap_rules(rules)
        return admin_pb2.DeletePolicyRuleResponse()

    # --- prices ----------------------------------------------------------------

    @unary(ADMIN)
    async def ImportPrices(self, request, context, key):
        if request.format != "litellm":
            raise InvalidArgument("format", f"unsupported format {request.format!r} "
                                            "(supported: 'litellm')")
        if not request.data:
            raise InvalidArgument("data", "must not be empty")
        if len(request.data) > MAX_IMPORT_BYTES:
            raise InvalidArgument("data", f"larger than {MAX_IMPORT_BYTES} bytes")
        try:
            mapping = json.loads(request.data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument("data", f"not valid JSON: {exc}") from None
        if not isinstance(mapping, dict):
            raise InvalidArgument("data", "must be a JSON object of model -> prices")
        rt = await self._rt(key)
        try:
            imported = rt.core.Catalog.from_litellm(mapping)
        except InvalidArgument as exc:
            raise InvalidArgument(f"data.{exc.field}", exc.message) from None
        specs = {m: imported.lookup(m).to_dict() for m in imported.models()}
        async with rt.admin_lock:
            # One transaction, one config version: peers never reload half an import.
            await self.store.put_prices(key.tenant_id, specs)
            merged = dict(rt.price_specs)
            merged.update(specs)
            rt.swap_prices(merged)
        skipped = [f"{name}: {reason}" for name, reason in imported.skipped]
        log.info("tenant %s: imported %d prices (%d skipped)", key.tenant_id, len(specs),
                 len(skipped))
        return admin_pb2.ImportPricesResponse(imported_count=len(specs), skipped=skipped,
                                              catalog_version=rt.catalog.version)

    @unary(READ)
    async def ListPrices(self, request, context, key):
        convert.check_str(request.model_filter, "model_filter")
        rt = await self._rt(key)
        needle = request.model_filter.lower()
        models = sorted(m for m in rt.catalog.models() if needle in m.lower())
        page, token = convert.offset_page(models, request.page_size, request.page_token)
        resp = admin_pb2.ListPricesResponse(next_page_token=token,
                                            catalog_version=rt.catalog.version)
        for m in page:
            convert.price_to_proto(rt.catalog.lookup(m), m in rt.price_specs,
                                   resp.prices.add())
        return resp

    # --- settings --------------------------------------------------------------

    @unary(READ)
    async def GetSettings(self, request, context, key):
        rt = await self._rt(key)
        return convert.settings_to_proto(rt.settings)

    @unary(ADMIN)
    async def UpdateSettings(self, request, context, key):
        if not request.HasField("settings"):
            raise InvalidArgument("settings", "is required")
        rt = await self._rt(key)
        async with rt.admin_lock:
            new = convert.settings_update(rt.settings, request.settings, request.update_mask)
            await self.store.put_settings(key.tenant_id, new)
            rt.swap_settings(new)
        return convert.settings_to_proto(new)

    # --- the price book (pricebook.py) --------------------------------------------

    @unary(ADMIN)
    async def PutPriceBook(self, request, context, key):
        from p402_server.ledger.pricebook import PriceBook

        try:
            doc = json.loads(request.document_json or "{}")
        except ValueError as exc:
            raise InvalidArgument("document_json", f"not JSON: {exc}") from None
        rt = await self._rt(key)
        book = PriceBook(doc, rt.core) if doc else None  # validates, naming the field
        async with rt.admin_lock:
            settings = _copy_settings(rt.settings)
            if book is None:
                settings.pop("price_book", None)
            else:
                settings["price_book"] = book.to_dict()
            await self.store.put_settings(key.tenant_id, settings)
            rt.swap_settings(settings)
        return _price_book(rt)

    @unary(READ)
    async def GetPriceBook(self, request, context, key):
        return _price_book(await self._rt(key))

    # --- statements (statements.py) ------------------------------------------------

    @unary(ADMIN)
    async def CloseStatements(self, request, context, key):
        rt = await self._rt(key)
        convert.check_str(request.customer, "customer")
        async with rt.admin_lock:  # one close at a time per tenant in this process
            customers = (await rt.statement_customers(request.period)
                         if request.every_customer else [request.customer])
            docs = [await rt.close_statement(request.period, c) for c in customers]
        return admin_pb2.Statements(statements=[_statement(d) for d in docs if d])

    @unary(READ)
    async def GetStatement(self, request, context, key):
        from p402_server.ledger import statements as st

        st.period_bounds(request.period)
        customer = convert.check_str(request.customer, "customer")
        doc = await self.store.get_statement(key.tenant_id, request.period, customer)
        if doc is None:
            raise not_found("period", "statement", f"{request.period}/{customer}")
        return _statement(doc)

    @unary(READ)
    async def ListStatements(self, request, context, key):
        customer = None if request.every_customer else convert.check_str(
            request.customer, "customer")
        resp = admin_pb2.ListStatementsResponse()
        for period, cust, ms, through in await self.store.list_statements(key.tenant_id,
                                                                          customer):
            resp.statements.add(period=period, customer=cust, close_time_ms=ms,
                                through_index=through)
        return resp

    @unary(READ)
    async def VerifyStatement(self, request, context, key):
        ok, reason, diff = await (await self._rt(key)).verify_statement(request.document_json)
        return admin_pb2.VerifyStatementResponse(ok=ok, reason=reason, differences=diff)

    # --- evidence keys (receipts.py, evidence.py) ----------------------------------

    @unary(READ)
    async def GetEvidenceKeys(self, request, context, key):
        return _evidence_keys(await self._rt(key))

    @unary(ADMIN)
    async def RotateEvidenceKey(self, request, context, key):
        """A new active evidence key; the old one stays published as retired, so what
        it signed (receipts, export digests) still verifies."""
        rt = await self._rt(key)
        async with rt.admin_lock:
            settings = _copy_settings(rt.settings)
            secrets = settings[_privacy.SECRETS]
            old_public = rt.receipt_signer().public_hex
            retired = list(secrets.get("evidence_keys_retired") or ())
            retired.insert(0, {"public_key": old_public,
                               "retired_ms": time.time_ns() // 1_000_000})
            secrets["evidence_keys_retired"] = retired
            secrets["evidence_key"] = signing.seal(signing.new_evidence_key())
            await self.store.put_settings(key.tenant_id, settings)
            rt.swap_settings(settings)
        log.info("tenant %s: evidence key rotated (retired %s)", key.tenant_id,
                 old_public[:16])
        return _evidence_keys(rt)

    # --- gateways (signed reports, privacy mode private_gateway; signing.py) -------
    # Kept in the tenant's settings under "secrets" (sealed; never returned again).

    @unary(ADMIN)
    async def RegisterGateway(self, request, context, key):
        prior = self._replayed(key, "RegisterGateway", request.request_id)
        if prior is not None:
            return prior
        gateway_id = convert.check_str(request.gateway_id, "gateway_id")
        convert.check_str(request.name, "name")
        rt = await self._rt(key)
        async with rt.admin_lock:
            settings = _copy_settings(rt.settings)
            gateways = settings[_privacy.SECRETS].setdefault("gateways", {})
            if not gateway_id:
                gateway_id = "gw_" + new_ulid()
            if gateway_id in gateways:
                raise Conflict(f"gateway {gateway_id!r} already exists (revoke it and "
                               "register a new id to rotate its secret)")
            secret = signing.new_gateway_secret()
            gateways[gateway_id] = {"name": request.name, "secret": signing.seal(secret),
                                    "created_ms": time.time_ns() // 1_000_000,
                                    "revoked_ms": 0}
            await self.store.put_settings(key.tenant_id, settings)
            rt.swap_settings(settings)
        log.info("tenant %s: gateway %s registered", key.tenant_id, gateway_id)
        resp = admin_pb2.RegisterGatewayResponse(
            gateway=_gateway_proto(gateway_id, gateways[gateway_id]), secret=secret.hex())
        self._remember(key, "RegisterGateway", request.request_id, resp)
        return resp

    @unary(READ)
    async def ListGateways(self, request, context, key):
        rt = await self._rt(key)
        gateways = (rt.settings.get(_privacy.SECRETS) or {}).get("gateways") or {}
        ids = sorted(gateways)
        page, token = convert.offset_page(ids, request.page_size, request.page_token)
        resp = admin_pb2.ListGatewaysResponse(next_page_token=token)
        for gid in page:
            resp.gateways.append(_gateway_proto(gid, gateways[gid]))
        return resp

    @unary(ADMIN)
    async def RevokeGateway(self, request, context, key):
        gateway_id = convert.check_str(request.gateway_id, "gateway_id", required=True)
        rt = await self._rt(key)
        async with rt.admin_lock:
            settings = _copy_settings(rt.settings)
            gw = settings[_privacy.SECRETS].get("gateways", {}).get(gateway_id)
            if gw is None:
                raise not_found("gateway_id", "gateway", gateway_id)
            if not gw.get("revoked_ms"):
                gw["revoked_ms"] = time.time_ns() // 1_000_000
                await self.store.put_settings(key.tenant_id, settings)
                rt.swap_settings(settings)
        log.info("tenant %s: gateway %s revoked", key.tenant_id, gateway_id)
        return _gateway_proto(gateway_id, gw)


def _copy_settings(settings: dict) -> dict:
    """A deep enough copy to change the gateways without touching the live dict."""
    out = dict(settings)
    secrets = dict(out.get(_privacy.SECRETS) or {})
    secrets["gateways"] = {k: dict(v) for k, v in (secrets.get("gateways") or {}).items()}
    out[_privacy.SECRETS] = secrets
    return out


def _gateway_proto(gateway_id: str, gw: dict) -> admin_pb2.Gateway:
    return admin_pb2.Gateway(gateway_id=gateway_id, name=gw.get("name", ""),
                             create_time_ms=gw.get("created_ms", 0),
                             revoke_time_ms=gw.get("revoked_ms") or 0)


def _statement(document: str) -> admin_pb2.Statement:
    from p402_server.ledger import statements as st

    return admin_pb2.Statement(document_json=document, csv=st.to_csv(json.loads(document)))


def _price_book(rt) -> admin_pb2.PriceBook:
    book = rt.price_book()
    if book is None:
        return admin_pb2.PriceBook(document_json="{}")
    return admin_pb2.PriceBook(document_json=json.dumps(book.to_dict(), sort_keys=True),
                               version=book.version)


def _evidence_keys(rt) -> admin_pb2.EvidenceKeys:
    """The tenant's published evidence key set as an EvidenceKeys message."""
    data = rt.evidence_keys()
    resp = admin_pb2.EvidenceKeys(tenant_id=rt.tenant_id, key_set_json=json.dumps(
        data, sort_keys=True, separators=(",", ":")))
    for k in data["keys"]:
        resp.keys.add(key_id=k["kid"], public_key_hex=k["public_key_hex"], status=k["status"],
                      retired_time_ms=k.get("retired_ms", 0))
    return resp


__all__ = ["AdminService"]

"""Documents signed with the tenant's evidence key: receipts of events, closed
monthly statements and their verification; the tenant's price book and evidence keys."""
from __future__ import annotations

import grpc

from p402_server.privacy import modes as _privacy
from p402_server.runtime import shared
from p402_server.wire.errors import ServiceError
from p402core import NotFound


class Documents:
    """TenantRuntime's receipts, statements, the price book and evidence keys (module docstring)."""

    def receipt_signer(self):
        """The active evidence key as a receipts.Signer (unsealed once per key)."""
        sealed = (self.settings.get(_privacy.SECRETS) or {}).get("evidence_key")
        if sealed is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "NO_EVIDENCE_KEY",
                               "the tenant has no evidence key")
        if self._signer is None or self._signer[0] != sealed:
            from p402_server.ledger import receipts
            from p402_server.privacy import signing

            self._signer = (sealed, receipts.Signer(signing.unseal(sealed)))
        return self._signer[1]

    async def receipt(self, event_id: str) -> str:
        """The signed receipt of a committed event of this tenant (NotFound if none):
        from memory when this process committed it (the writer set its chain
        position), else from the store."""
        ev = self._events.get(event_id)
        if ev is None or not ev.seq or not ev.chain_index:
            ev = await self.store.get_event(self.tenant_id, event_id)
            if ev is None:
                raise NotFound("event", event_id)
        return self.receipt_signer().sign(ev)

    async def close_statement(self, period: str, customer: str) -> str | None:
        """Close `period` for `customer` (statements.py: what it covers): the stored
        statement when it was closed before, else a new one, signed and stored; None
        when there is nothing to state (no spend in the period, no late events)."""
        from p402_server.ledger import statements as st

        start, end = st.period_bounds(period)
        store, tid = self.store, self.tenant_id
        stored = await store.get_statement(tid, period, customer)
        if stored is not None:
            return stored
        if end > shared._now_ms():
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "PERIOD_OPEN",
                               f"period {period} has not ended: it can be closed from "
                               f"{st.period_of(end)}-01 00:00 UTC")
        closes = await store.list_statements(tid, customer)
        after = max((t for *_x, t in closes), default=0)
        closed = {p for p, *_x in closes}
        through, head = await store.chain_head(tid)
        regular, late = st.select(
            {"customer": customer, "period_start_ms": start, "period_end_ms": end,
             "through_index": through, "after_index": after,
             "closed_before": closed - {period}},
            await self._statement_candidates(customer, start, end, through, after))
        book = self.price_book()
        doc = st.body(tenant_id=tid, period=period, customer=customer, closed_ms=shared._now_ms(),
                      through=through, after=after, head_hash=head, regular=regular,
                      late=late, closed_before=closed - {period},
                      price_book_version=book.version if book else "")
        if not doc["totals"]["events"]:
            return None
        return await store.put_statement(tid, period, customer, doc["closed_ms"], through,
                                         st.sign(doc, self.receipt_signer()))

    async def _statement_candidates(self, customer: str, start: int, end: int,
                                    through: int, after: int) -> list:
        """The events a statement can cover (statements.select picks): the customer's
        events of [start, end) up to `through`, and those committed in (after,
        through] whatever their month."""
        rows = await self.store.statement_rows(self.tenant_id, customer, max_index=through,
                                               since_ms=start, until_ms=end)
        rows += await self.store.statement_rows(self.tenant_id, customer,
                                                max_index=through, min_index=after)
        return list({e.event_id: e for e in rows}.values())

    async def statement_customers(self, period: str) -> list[str]:
        """Every customer with spend in `period` or a statement before (late events)."""
        from p402_server.ledger import statements as st

        start, end = st.period_bounds(period)
        through, _head = await self.store.chain_head(self.tenant_id)
        rows = await self.store.statement_rows(self.tenant_id, None, max_index=through,
                                               since_ms=start, until_ms=end)
        known = {c for _p, c, *_x in await self.store.list_statements(self.tenant_id)}
        return sorted({e.customer for e in rows if e.cost_nanos or e.revenue_nanos} | known)

    async def verify_statement(self, text: str) -> tuple[bool, str, list[str]]:
        """A statement checked against the ledger: its signature with this tenant's
        keys, and its lines, adjustments, totals and range recomputed from the events
        it claims to cover."""
        from p402_server.ledger import receipts
        from p402_server.ledger import statements as st

        keys = receipts.keys_from_set(self.evidence_keys())
        ok, why, doc = st.verify_document(text, keys)
        if not ok:
            return False, why, []
        if doc["tenant_id"] != self.tenant_id:
            return False, "a statement of another tenant", []
        start, end = doc["period_start_ms"], doc["period_end_ms"]
        through, after = int(doc["through_index"]), int(doc["after_index"])
        again = st.recompute(doc, await self._statement_candidates(
            doc["customer"], start, end, through, after))
        head = (await self.store.statement_rows(self.tenant_id, None, max_index=through,
                                                min_index=through - 1)) if through else []
        again["head_hash"] = head[0].chain_hash if head else ""
        diff = st.differences(doc, again)
        if diff:
            return False, "the statement differs from the ledger: " + ", ".join(diff), diff
        return True, "", []

    def price_book(self):
        """The tenant's price book (pricebook.PriceBook), or None (parsed once per
        document)."""
        doc = self.settings.get("price_book")
        if not doc:
            return None
        if self._price_book is None or self._price_book[0] is not doc:
            from p402_server.ledger.pricebook import PriceBook

            self._price_book = (doc, PriceBook(doc, self.core))
        return self._price_book[1]

    def evidence_keys(self) -> dict:
        """The published key set (receipts.key_set): the active key, then the retired."""
        from p402_server.ledger import receipts

        retired = (self.settings.get(_privacy.SECRETS) or {}).get("evidence_keys_retired") or ()
        return receipts.key_set(self.tenant_id, self.receipt_signer().public_hex, retired)

"""Deciding: Authorize in memory (never awaiting), the exact take of a leased
budget's last nanos, and the privacy rules a request must meet before the engine
sees it (modes allowed, content kept as the mode says). A DENY is written behind as
a ledger event."""
from __future__ import annotations

import logging

from p402.v1 import meter_pb2
from p402_server.ledger.evidence import evidence_for
from p402_server.ledger.model import Content, LedgerEvent
from p402_server.privacy import modes as _privacy
from p402_server.runtime import shared
from p402_server.runtime.shared import new_ulid
from p402_server.wire import convert
from p402core import (
    BUDGET_EXCEEDED,
    POLICY_PRIVACY_MODE_NOT_ALLOWED,
    Conflict,
    Decision,
    Evidence,
    InvalidArgument,
    Outcome,
)

log = logging.getLogger("p402.server.runtime")


class Deciding:
    """TenantRuntime's Authorize and the privacy rules it applies (module docstring)."""

    async def authorize_exact(self, req, core: bool = False):
        """`authorize`, and with leases, at the very end of a budget: when only a
        leased budget denied (its local slice is spent), take exactly what this
        request needs from the store (LeaseManager.take_exact: one conditional
        statement that cannot pass the limit) and decide again. Awaits the store only
        on such a DENY; otherwise the same as `authorize`."""
        leases = self.leases
        if leases is None:
            return self.authorize(req, core=core)
        denied: list = []
        resp = self.authorize(req, exact=denied, core=core)
        if resp is not None:
            return resp
        await leases.take_exact(self, denied[0])
        return self.authorize(req, core=core)

    def authorize(self, req, exact: list | None = None, core: bool = False):
        """AuthorizeRequest -> AuthorizeResponse, in memory (never awaits).

        `exact` (a list; `authorize_exact`): when a leased budget alone denies, the
        engine's Authorization is appended to it and None returned, with no side
        effect (nothing held, nothing written): the caller may take exactly what
        is missing from the store and call again.

        `core` (a caller in this process, gateways/inprocess.py): the engine's own
        Authorization instead, when it is the whole answer (nothing kept for a
        replay: no reservation or request id; no store-level budget statuses), so
        no message is built only to be read back; otherwise the AuthorizeResponse."""
        args = convert.authorize_args(req, self.settings["default_privacy_mode"])
        mode = self.privacy.resolve(req.privacy_mode)
        if not self.privacy.allowed(mode):
            return self._deny_privacy(req, args, mode)
        rid = args["reservation_id"]
        # A retried Authorize (same caller reservation id, or same request_id) gets
        # the first answer back instead of a second hold.
        if rid or req.request_id:
            prior = self._authorizations.get(rid or "\0" + req.request_id)
            if prior is not None:
                return prior
            if rid and rid in self._by_reservation:
                raise Conflict(f"reservation {rid!r} was already settled")
        leases = self.leases
        if leases is not None:  # scale-out: past a lease deadline, spend nothing
            leases.check(self)
        a = self.engine.authorize(req.model, **args)
        if leases is not None and a.decision == Decision.DENY:
            leases.denied(self)  # top the lease up now, not at the next tick
            if exact is not None and BUDGET_EXCEEDED in a.reasons:
                exact.append(a)
                return None
        if (core and not self._status_base and not args["reservation_id"]
                and not req.request_id):
            resp = a
        else:
            resp = convert.authorization_to_proto(a)
        if self._status_base and a.budgets:  # scale-out: the store's status
            del resp.budgets[:]
            for st in self._store_level(list(a.budgets)):
                convert.budget_status_to_proto(st, resp.budgets.add())
        if mode != _privacy.METADATA_ONLY and a.reservation_id and req.content:
            # Hashed (and, where the mode keeps text, held) in memory for the Record;
            # metadata_only keeps nothing, the content was only measured.
            kept = self.privacy.keep(mode, req.content, None)
            held = self._hold_privacy
            if not held.hold(a.reservation_id, kept.prompt_fingerprint,
                             req.content if kept.texts else None) \
                    and held.dropped % 1000 == 1:
                log.warning("tenant %s: open holds' prompts past held_prompts_mib (%d "
                            "not held so far): their events keep a prompt only if the "
                            "Record sends it", self.tenant_id, held.dropped)
        if a.decision == Decision.DENY:
            self._write_denied(req, a, args)
        else:
            rid = a.reservation_id
            # The hold keeps the prompt's size, never the prompt: content sent with
            # Authorize is measured here and not kept until the holds' flush.
            content = args["content"]
            input_bytes = (args["input_bytes"] if content is None
                           else len(content.encode("utf-8", "surrogatepass")))
            self._hold_upserts[rid] = (a, args["owners"], args["labels"], input_bytes,
                                       self.catalog, self.engine)
            if (a.decision != Decision.ALLOW or req.attempt or req.retry_of
                    or args["privacy_mode"] != self.settings["default_privacy_mode"]):
                self._hold_meta[rid] = (int(a.decision), tuple(a.reasons),
                                        tuple(a.rule_ids), int(args["privacy_mode"]),
                                        req.attempt, req.retry_of)
        if args["reservation_id"]:
            self._authorizations.put(args["reservation_id"], resp)
        elif req.request_id:
            self._authorizations.put("\0" + req.request_id, resp)
        return resp

    def _deny_privacy(self, req, args, mode: int):
        """Authorize under a privacy mode the tenant does not allow: DENY (data, not
        an error), written behind as a denied event like any other DENY."""
        resp = meter_pb2.AuthorizeResponse(
            decision=int(Decision.DENY), reasons=[POLICY_PRIVACY_MODE_NOT_ALLOWED],
            model=req.model, provider=req.provider)
        convert.set_money(resp.estimated_cost, 0)
        ev = LedgerEvent(
            tenant_id=self.tenant_id, event_id="den_" + new_ulid(), event_ms=shared._now_ms(),
            kind="denied",
            **dict(zip(("customer", "feature", "workflow", "task", "department",
                        "employee"), args["owners"])),
            labels=args["labels"] or {}, provider=req.provider, model=req.model,
            decision=int(Decision.DENY), reasons=(POLICY_PRIVACY_MODE_NOT_ALLOWED,),
            outcome=int(Outcome.DENIED), evidence=int(Evidence.ESTIMATED),
            privacy_mode=mode, attempt=req.attempt, retry_of=req.retry_of)
        self.writer.write_behind(ev)
        return resp

    def _record_mode(self, req, field: str) -> int:
        """The privacy mode a Record's event is kept under: the one it asks for (or
        the tenant's default), or metadata_only when the tenant does not allow that
        mode. Unlike an Authorize, which is denied before the provider is called, a
        Record reports a call that happened and was charged: its spend is metered
        all the same, keeping less than it asked for, never more, and its event
        says so (reason policy.privacy_mode_not_allowed, `_record_event`)."""
        for name in ("prompt", "response"):
            if len(getattr(req, name)) > _privacy.MAX_CONTENT_CHARS:
                raise InvalidArgument(field + name, "larger than 64 MiB")
        mode = self.privacy.resolve(req.privacy_mode)
        return mode if self.privacy.allowed(mode) else _privacy.METADATA_ONLY

    def _apply_privacy(self, ev: LedgerEvent, req, mode: int, attested: bool) -> None:
        """Fingerprints, duplicate_of, kept content and evidence of a Record's event
        (privacy.py, evidence.py). The Record's text is dropped here for
        metadata_only: it never reaches the store or a log line."""
        ev.privacy_mode = mode
        held = self._hold_privacy.pop(ev.reservation_id, None) if ev.reservation_id else None
        prompt = req.prompt or (held[1] if held else None)
        kept = self.privacy.keep(mode, prompt, req.response or None,
                                 prompt_fp=held[0] if held else None)
        ev.prompt_fingerprint = kept.prompt_fingerprint
        ev.response_fingerprint = kept.response_fingerprint
        if kept.texts:
            expires = ev.event_ms + self.privacy.retention_ms
            ev.contents = tuple(Content(kind=k, text=t, mode=mode, expires_ms=expires)
                                for k, t in kept.texts)
        ev.evidence = evidence_for(ev.evidence, attested=attested,
                                   fingerprinted=kept.prompt_fingerprint is not None
                                   or kept.response_fingerprint is not None)

    async def _mark_duplicate(self, ev: LedgerEvent) -> None:
        """duplicate_of: the earlier event with this prompt fingerprint and owner
        within the tenant's window (memory first, then the store)."""
        fp = ev.prompt_fingerprint
        if not fp:
            return
        owners = (ev.customer, ev.feature, ev.workflow, ev.task, ev.department,
                  ev.employee)
        key = self.privacy.owner_key(owners)
        now = ev.event_ms or shared._now_ms()
        first = self.privacy.recent_duplicate(key, fp, now)
        find = getattr(self.store, "find_duplicate", None)
        if first is None and find is not None:
            first = await find(self.tenant_id, owners, fp,
                               max(0, now - self.privacy.window_ms))
        if first is not None and first != ev.event_id:
            ev.duplicate_of = first
        else:
            self.privacy.remember(key, fp, ev.event_id, now)

    def _write_denied(self, req, a, args) -> None:
        owners = args["owners"]
        ev = LedgerEvent(
            tenant_id=self.tenant_id,
            event_id=args["reservation_id"] or "den_" + new_ulid(),
            event_ms=shared._now_ms(),
            kind="denied",
            customer=owners[0], feature=owners[1], workflow=owners[2],
            task=owners[3], department=owners[4], employee=owners[5],
            labels=args["labels"] or {},
            provider=a.provider or req.provider,
            model=a.model or req.model,
            estimated_cost_nanos=a.estimated_cost_nanos,
            decision=int(Decision.DENY),
            reasons=tuple(a.reasons),
            rule_ids=tuple(a.rule_ids),
            outcome=int(Outcome.DENIED),
            evidence=int(Evidence.ESTIMATED),
            privacy_mode=int(args["privacy_mode"]),
            attempt=req.attempt,
            retry_of=req.retry_of,
            catalog_version=a.catalog_version,
        )
        self.writer.write_behind(ev)

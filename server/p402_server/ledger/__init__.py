"""The P402 store: the durable ledger, hourly rollups, budget periods, tenants, keys,
per-tenant config and holds, on SQLAlchemy 2 async (SQLite default, PostgreSQL for
scale-out; same code, same tests). DESIGN §3, §9, §10.

Modules: ``schema`` (tables), ``model`` (Python types), ``engine`` (``Store``,
``open_store``), ``writer`` (``GroupCommitWriter``, the only event write path),
``queries`` (filters, page tokens, spend SQL), ``canonical`` (the versioned canonical
encoding of an event and the per-tenant hash chain); migrations live in
``p402_server/migrations`` (Alembic; 0002 adds the chain positions, fingerprints,
contents and spend_daily).

API (all coroutines unless noted; every call is scoped by ``tenant_id``)::

    store = await open_store(url, *, create=True, clock=None)
        # url: sqlite+aiosqlite:///p402.db | postgresql+asyncpg://… ; plain sqlite:///…
        # and postgresql://… (postgres://…) mean the same. Bad URL → ValueError
        # (InvalidArgument, field "db"). create=True runs migrate(). SQLite runs WAL,
        # synchronous=FULL, foreign_keys=ON, busy_timeout on every connection.
    await store.migrate()                  # Alembic upgrade head; idempotent
    await store.schema_revision() -> str | None
    await store.close()

    # tenants and keys
    create_tenant(name, *, settings=None) -> tenant_id
    get_tenant(tenant_id) -> Tenant | None ; list_tenants() -> list[Tenant]
    get_settings(tenant_id) -> dict ; put_settings(tenant_id, dict)   # NotFound: tenant
    create_key(tenant_id, scopes, name="") -> (KeyInfo, plaintext)
        # plaintext "p402_" + 40 base62 chars, returned once; stored: prefix (first
        # 12 chars) + SHA-256 hex. scopes ⊆ {"meter","read","admin"}, non-empty
        # (list or comma string). NotFound for an unknown tenant.
    find_key(plaintext, *, include_revoked=False) -> KeyInfo | None
        # revoked keys are None by default: revocation takes effect at once
    list_keys(tenant_id, *, include_revoked=True) -> list[KeyInfo]
    revoke_key(tenant_id, key_id) -> bool   # False when the key is not this tenant's
    touch_key(key_id, now_ms=None)

    # config: specs are the p402core object's to_dict(), opaque JSON to the store
    put_budget(tenant_id, budget_id, spec) ; get_budget(…) -> dict | None
    delete_budget(tenant_id, budget_id) -> bool ; list_budgets(tenant_id) -> {id: spec}
    put_policy / get_policy / delete_policy / list_policies     (policy_id)
    put_price / get_price / delete_price / list_prices           (model)
    config_versions(tenant_ids) -> {tenant_id: int}
        # every put/delete above and put_settings bump the tenant's config version
        # in their own transaction (a delete that found nothing does not); one read
        # tells a process sharing the store which tenants' engines are stale

    # holds: write-behind of the engine's open reservations
    save_holds(tenant_id, upserts=[(reservation_id, expires_ms, data)], deletes=[rid])
    load_holds(tenant_id) -> [(reservation_id, expires_ms, data)]
    get_hold(tenant_id, reservation_id) -> data | None   # one saved hold (scale-out)
    prune_hold_claims(before_ms) -> n   # hold_claims rows older than before_ms

    # budgets on restart
    budget_totals(tenant_id) -> {(budget_id, period_start_ms): committed_nanos}
    recompute_budget_totals(tenant_id) -> same, from the events (verification)
    settled_reservations(tenant_id, reservation_ids) -> {reservation_id: event_id}
        # the holds an event already settled (restart: never restore those); batched

    # hash chain (canonical.py): every committed event has chain_index 1, 2, … per
    # tenant and chain_hash = SHA-256(prev hash || canonical_bytes(event)), hex
    chain_head(tenant_id) -> (chain_index, chain_hash)      # (0, GENESIS) when empty
    verify_chain(tenant_id) -> VerifyResult(ok, count, head, first_bad_index, reason)
        # names the first bad position: modified, deleted, inserted, reordered
    # canonical.canonical_bytes(ev), chain_step(prev_hex, ev) -> hex,
    # verify_events(events, prev_hex=GENESIS, first_index=1) (an export's walk)

    # contents (redacted_trace / full_trace; never read by metadata queries/exports)
    put_contents([Content(kind, text, mode, expires_ms, created_ms, tenant_id,
                          event_id)]) -> n                   # upsert by (t, e, kind)
    get_contents(tenant_id, event_id) -> [Content]            # prompt, then response
    purge_contents(now_ms=None) -> n        # deletes 0 < expires_ms <= now
    find_duplicate(tenant_id, owners, fingerprint, since_ms, *, field="prompt")
        -> event_id | None   # earliest event of the same six owners with that
                             # prompt (or response) fingerprint at/after since_ms

    # ledger reads (flt: EventFilter | None = everything)
    get_event(tenant_id, event_id) -> LedgerEvent | None
    query_events(tenant_id, flt=None, *, page_size=0, page_token="", order="desc")
        -> (list[LedgerEvent], next_page_token)
        # keyset on seq; page_size 0 → 100, > 1000 → 1000, < 0 → InvalidArgument
        # "page_size"; a bad or foreign token → InvalidArgument "page_token"
    query_spend(tenant_id, flt=None, group_by=(), *, page_size=0, page_token="",
                source="auto") -> (list[SpendRow], next_page_token)
        # group_by ⊆ customer feature workflow task department employee provider
        # model outcome decision evidence hour day month (UTC bucket start in ms;
        # outcome/decision/evidence values are enum NAMES, "SUCCESS");
        # unknown → InvalidArgument "group_by". Ordered by cost desc, then groups.
        # Reads spend_daily for customer/day/month groups with at most a customer
        # filter and day-aligned bounds; else rollups_hourly when the filter has no
        # labels, no kinds and hour-aligned since/until; else aggregates events.
    iter_events(tenant_id, flt=None, *, batch=1000) -> async iterator, seq order
    count_events(tenant_id, flt=None) -> int

    # the write path
    writer = GroupCommitWriter(store, *, max_batch=1000, max_delay_ms=2,
                               retry_limit=5, retry_base_s=0.05)
    await writer.start()
    await writer.write(event) -> WriteResult(event, seq, duplicate)   # after commit
        # event: a LedgerEvent; validated first (InvalidArgument naming the field).
        # The writer owns it from then on: it fills seq, recorded_ms (when 0),
        # event_ms (when 0), chain_index and chain_hash, and writes its `contents`
        # (if any) in the same transaction. On a duplicate (tenant_id, event_id),
        # WriteResult.event is the FIRST one (the ledger's copy) and nothing is
        # counted, chained or stored twice.
        # event.claim = True (scale-out, leases on; not a column): the event also
        # claims its reservation_id in hold_claims, in the same transaction; if
        # another event_id holds that claim, nothing is written and
        # WriteResult.claimed_by names it (seq 0, duplicate False).
    writer.write_behind(event)        # no wait; retried on failure, never dropped silently
    # (a write-behind event that loses its claim is dropped: no caller to tell)
    await writer.flush()              # everything enqueued before the call is settled
    await writer.stop()               # flush + end; idempotent; later writes raise
    writer.stats -> WriterStats(transactions, failed_transactions, events,
                                duplicates, retries, dead_letters, largest_batch)
    writer.dead_letters -> list[LedgerEvent]   # write-behind events given up (logged)

Types (``model``): ``LedgerEvent`` (one events row; owners as six str fields, labels
dict, reasons/rule_ids/budget_ids tuples, budget_charges ((budget_id,
period_start_ms), …) — stored too, in the added ``budget_charges`` column, so
budget_periods can be recomputed from the ledger), ``EventFilter`` (half-open
[since_ms, until_ms) on event_ms; 0 = unbounded), ``SpendRow``, ``KeyInfo``,
``Tenant``, ``WriteResult`` (a NamedTuple). Event kinds: ``KINDS``.

``sqlite://`` (in memory) works on one shared connection: for tests and demos.

Errors are ``p402core._enums`` types: ``InvalidArgument`` (a ValueError; ``.field``
names the field) and ``NotFound``.
"""
from __future__ import annotations

from p402_server.ledger.canonical import (
    GENESIS,
    VerifyResult,
    canonical_bytes,
    chain_step,
    verify_events,
)
from p402_server.ledger.engine import SCOPES, Store, hash_key, normalize_url, open_store
from p402_server.ledger.model import (
    Content,
    EventFilter,
    KeyInfo,
    LedgerEvent,
    SpendRow,
    Tenant,
    WriteResult,
)
from p402_server.ledger.queries import GROUPS
from p402_server.ledger.schema import KINDS
from p402_server.ledger.writer import EventRejected, GroupCommitWriter, WriterStats

__all__ = [
    "open_store",
    "normalize_url",
    "hash_key",
    "Store",
    "GroupCommitWriter",
    "WriterStats",
    "WriteResult",
    "LedgerEvent",
    "Content",
    "VerifyResult",
    "GENESIS",
    "canonical_bytes",
    "chain_step",
    "verify_events",
    "EventFilter",
    "SpendRow",
    "KeyInfo",
    "Tenant",
    "KINDS",
    "GROUPS",
    "SCOPES",
]

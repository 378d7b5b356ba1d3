"""Commands that read the ledger and its evidence: `events`, `spend`, `export`,
`verify`, `contents purge`, `receipts`, `statements` and `billing export`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from p402_server.cli.common import (
    DEFAULT_DB,
    GROUP_KEYS,
    UsageError,
    _api_key,
    _client,
    _existing_db,
    _filter_kwargs,
    _filters,
    _fmt,
    _json_flag,
    _read_text,
    _redact_url,
    _remote,
    _run_store,
    command_group,
    parse_group_by,
    parse_int,
)
from p402_server.cli.output import (
    EVENT_COLUMNS,
    EVENT_DROP,
    Output,
    _event_dict,
    event_row,
    print_spend,
    spend_totals,
    usd,
)
from p402core import InvalidArgument


def cmd_billing_export(args: argparse.Namespace, out: Output) -> int:
    from p402_server.ledger import billing, statements
    from p402_server.ledger.model import LedgerEvent

    doc = None
    if args.statement:
        try:
            doc = json.loads(_read_text("--statement", args.statement))
            start, end = doc["period_start_ms"], doc["period_end_ms"]
            args.customer = doc["customer"]
            # late events of the months closed before it may be adjustments
            for month in doc["closed_before"]:
                start = min(start, statements.period_bounds(month)[0])
            end = max(end, int(time.time() * 1000) + 86_400_000)  # events committed since, of closed months
        except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
            raise UsageError("--statement", f"not a P402 statement: {exc}") from None
    else:
        try:
            start, end = statements.period_bounds(args.period)
        except InvalidArgument as exc:
            raise UsageError("--period", exc.message) from None
    customers = None
    if args.customer_map:
        try:
            customers = json.loads(_read_text("--customer-map", args.customer_map))
        except ValueError as exc:
            raise UsageError("--customer-map", f"not JSON: {exc}") from None
        if not isinstance(customers, dict):
            raise UsageError("--customer-map", "must be a JSON object")
    filters: dict[str, Any] = {"since": start, "until": end}
    if args.customer is not None:
        filters["owners"] = {"customer": args.customer}
    events = []
    with _client(args) as p402:
        tenant_id = p402.ping().tenant
        for e in p402.iter_query(page_size=1000, **filters):
            u = e.usage
            events.append(LedgerEvent(
                tenant_id=tenant_id, event_id=e.event_id, event_ms=e.event_time_ms,
                customer=e.owners.customer, feature=e.owners.feature,
                workflow=e.owners.workflow, model=e.model, provider=e.provider,
                input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
                cache_write_tokens=u.cache_write_tokens, output_tokens=u.output_tokens,
                reasoning_tokens=u.reasoning_tokens, units=dict(u.units),
                service_tier=u.service_tier, cost_nanos=e.cost_nanos,
                revenue_nanos=e.revenue_nanos, chain_index=e.chain_index))
    if doc is not None:
        regular, late = statements.select(doc, events)
        events = regular + late
    events.sort(key=lambda ev: (ev.event_ms, ev.event_id))
    try:
        rows = billing.export(events, args.format, tenant_id=tenant_id, name=args.name,
                              value=args.value, customers=customers)
    except InvalidArgument as exc:
        raise UsageError("--" + exc.field if exc.field != "customer" else "--customer-map",
                         exc.message) from None
    text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows)
    if args.output in ("-", ""):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise UsageError("--output", f"{args.output}: {exc.strerror}") from None
        out.err.print(f"{len(rows)} event(s) written to {args.output}")
    return 0


def _print_statements(out: Output, docs: list[dict], fmt: str) -> None:
    from p402_server.ledger.statements import to_csv

    if fmt == "csv":
        for i, d in enumerate(docs):
            text = to_csv(d)
            out.print(text if i == 0 else text.split("\n", 1)[1], markup=False,
                      soft_wrap=True, highlight=False, end="")
    else:
        out.json(docs)


def cmd_statements_close(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        docs = p402.close_statements(args.period, args.customer)
    _print_statements(out, docs, args.format)
    return 0


def cmd_statements_show(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        doc = p402.get_statement(args.period, args.customer)
    if args.format == "csv":
        _print_statements(out, [doc], "csv")
    else:
        out.json(doc)
    return 0


def cmd_statements_verify(args: argparse.Namespace, out: Output) -> int:
    """Exit 0 when the statement holds, 1 when altered or not backed by the ledger."""
    from p402_server.ledger import statements

    text = _read_text("FILE", args.file).strip()
    if args.ledger:
        with _client(args) as p402:
            v = p402.verify_statement(text)
        ok, reason, diff = v["ok"], v["reason"], v["differences"]
    else:
        if args.export and args.ledger:
            raise UsageError("--export", "goes with --keys, not --ledger")
        ok, reason, doc = statements.verify_document(text, _key_set(args.keys))
        diff = []
        if ok and args.export:
            ok, reason, diff = _statement_vs_export(doc, args.export)
    if args.json:
        out.json({"ok": ok, "reason": reason, "differences": diff})
    else:
        out.print("OK: statement intact" + (" and backed by the ledger" if args.ledger else
                                            " (signature)") if ok else f"INVALID: {reason}",
                  markup=False)
    return 0 if ok else 1


def _statement_vs_export(doc: dict, path: str) -> tuple[bool, str, list[str]]:
    """A statement recomputed from an export's rows (whose chain and digest must hold)."""
    from p402_server.ledger import statements
    from p402_server.ledger.evidence import BadInput, ledger_event, read_export, verify_rows

    try:
        fmt, rows, digest = read_export(path)
    except BadInput as exc:
        raise UsageError("--export", str(exc)) from None
    v = verify_rows(rows, digest, fmt=fmt)
    if not v.ok:
        return False, f"the export is broken: {v.reason}", []
    events = [ledger_event(r, doc["tenant_id"]) for r in rows]
    again = statements.recompute(doc, events)
    at = [e.chain_hash for e in events if e.chain_index == doc["through_index"]]
    again["head_hash"] = at[0] if at else doc["head_hash"]  # an export may end earlier
    diff = statements.differences(doc, again)
    if diff:
        return False, "the statement differs from the export: " + ", ".join(diff), diff
    return True, "", []


def cmd_receipts_get(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        receipt = p402.get_receipt(args.event_id)
    out.print(receipt, markup=False, soft_wrap=True, highlight=False)
    return 0


def _key_set(source: str) -> dict[str, str]:
    """{kid: public key hex} from a key set file or URL (exit 2 when unreadable)."""
    from p402_server.ledger import receipts

    if source.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=10) as resp:  # noqa: S310
                text = resp.read().decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - any fetch failure is bad usage
            raise UsageError("--keys", f"cannot fetch {source}: {exc}") from None
    else:
        text = _read_text("--keys", source)
    try:
        keys = receipts.keys_from_set(json.loads(text))
    except ValueError as exc:
        raise UsageError("--keys", f"not JSON: {exc}") from None
    if not keys:
        raise UsageError("--keys", "no Ed25519 key in the key set")
    return keys


def cmd_receipts_verify(args: argparse.Namespace, out: Output) -> int:
    """Exit 0 when the receipt holds, 1 when altered or signed by an unknown key."""
    from p402_server.ledger import receipts

    text = _read_text("FILE", args.file)
    keys = _key_set(args.keys)
    ok, reason, doc = receipts.verify(text.strip(), keys)
    if args.json:
        out.json({"ok": ok, "reason": reason, "event_id": (doc or {}).get("event_id"),
                  "kid": (doc or {}).get("kid"), "cost_nanos": (doc or {}).get("cost_nanos")})
    elif ok:
        out.print(f"OK: receipt of {doc['event_id']} ({usd(doc['cost_nanos'])} USD, "
                  f"chain index {doc['chain_index']}) signed by key {doc['kid']}",
                  markup=False)
    else:
        out.print(f"INVALID: {reason}", markup=False)
    return 0 if ok else 1


def cmd_events(args: argparse.Namespace, out: Output) -> int:
    limit = parse_int("--limit", args.limit, minimum=1)
    filters = _filter_kwargs(args)
    events = []
    with _client(args) as p402:
        for e in p402.iter_query(page_size=min(limit, 1000), **filters):
            events.append(e)
            if len(events) >= limit:
                break
    if args.json:
        out.json([_event_dict(e) for e in events])
        return 0
    out.table(f"Events (newest first, at most {limit})", EVENT_COLUMNS,
              (event_row(e) for e in events), drop=EVENT_DROP)
    return 0


def cmd_spend(args: argparse.Namespace, out: Output) -> int:
    group_by = parse_group_by(args.by)
    filters = _filter_kwargs(args)
    with _client(args) as p402:
        rows = list(p402.iter_query(group_by=group_by, page_size=1000, **filters))
    if args.json:
        t = spend_totals(rows)
        out.json({
            "group_by": group_by,
            "rows": [dict(r.to_dict(), cost_usd=usd(r.cost_nanos),
                          revenue_usd=usd(r.revenue_nanos),
                          margin_usd=usd(r.margin_nanos)) for r in rows],
            "totals": dict(t, cost_usd=usd(t["cost_nanos"]),
                           revenue_usd=usd(t["revenue_nanos"]),
                           margin_usd=usd(t["margin_nanos"])),
        })
        return 0
    since = f" since {args.since}" if args.since else ""
    print_spend(out, f"Spend by {', '.join(group_by)}{since}", group_by, rows)
    return 0


def _count_estimate(p402: Any, filters: dict[str, Any]) -> int | None:
    """How many events the export will send (for the progress bar), from spend rows."""
    try:
        rows = list(p402.iter_query(group_by=["month"], page_size=1000, **filters))
    except Exception:  # noqa: BLE001 - only a progress hint; the export decides
        return None
    return sum(r.event_count for r in rows)


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    """ExportEvents -> rows (evidence.py formats), then the signed digest the server
    sends in the call's trailing metadata."""
    import grpc

    from p402.v1 import meter_pb2, meter_pb2_grpc
    from p402_client import _convert
    from p402_server.ledger.evidence import DIGEST_HEADER, ExportWriter, event_row

    filters = _filter_kwargs(args)
    args.api_key = _api_key(args.api_key)
    to_file = args.output not in ("-", "")
    with_digest = to_file if args.digest is None else args.digest
    sidecar = to_file and args.format in ("csv", "focus")
    if to_file:
        try:
            fh = open(args.output, "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise UsageError("--output", f"{args.output}: {exc.strerror}") from None
    else:
        fh = sys.stdout
    count = 0
    progress = task = None
    try:
        with _client(args) as p402:
            if to_file:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                total = _count_estimate(p402, filters)
                progress = Progress(TextColumn("exporting"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(),
                                    console=out.err, transient=False)
                progress.start()
                task = progress.add_task("export", total=total)
        writer = ExportWriter(fh, args.format)
        req = meter_pb2.ExportEventsRequest(filter=_convert.event_filter(**filters))
        with grpc.insecure_channel(args.target) as channel:
            call = meter_pb2_grpc.MeterServiceStub(channel).ExportEvents(
                req, metadata=(("authorization", f"Bearer {args.api_key}"),))
            try:
                for pb in call:
                    writer.row(event_row(pb))
                    count += 1
                    if progress is not None and count % 256 == 0:
                        progress.update(task, completed=count)
                trailing = dict(call.trailing_metadata() or ())
            except grpc.RpcError as err:
                from p402_client.errors import from_rpc_error

                raise from_rpc_error(err) from None
        digest = json.loads(trailing[DIGEST_HEADER]) if DIGEST_HEADER in trailing else None
        if with_digest and digest is not None:
            if sidecar:
                with open(args.output + ".digest.json", "w", encoding="utf-8") as dfh:
                    json.dump(digest, dfh, sort_keys=True, indent=2)
                    dfh.write("\n")
            else:
                writer.digest(digest)
    finally:
        if progress is not None:
            progress.update(task, completed=count, total=count)
            progress.stop()
        if to_file:
            fh.close()
        else:
            fh.flush()
    if to_file:
        out.err.print(f"Exported {count} event(s) to {args.output}.")
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Exit 0 when the chain (and digest) hold, 1 when broken, 2 on bad input."""
    from p402_server.ledger.evidence import BadInput, read_export, verify_rows

    if args.file:
        try:
            fmt, rows, digest = read_export(args.file)
            sidecar = args.file + ".digest.json"
            if digest is None and os.path.exists(sidecar):
                with open(sidecar, encoding="utf-8") as fh:
                    digest = json.load(fh)
            v = verify_rows(rows, digest, public_key=args.public_key, fmt=fmt)
        except BadInput as exc:
            raise UsageError("--file", str(exc)) from None
        except ValueError as exc:
            raise UsageError("--file", f"unreadable digest: {exc}") from None
        result = {"ok": v.ok, "file": args.file, "format": v.fmt, "count": v.count,
                  "head": v.head, "first_bad_row": v.bad_row, "reason": v.reason,
                  "signed_by": v.signed_by}
        if args.json:
            out.json(result)
        elif v.ok:
            out.print(f"OK: {v.count} event(s), chain and signed digest intact "
                      + (f"(head {v.head[:16]}…, " if v.head else "(")
                      + f"signed by {v.signed_by[:16]}…)",
                      markup=False)
        else:
            where = f" at row {v.bad_row}" if v.bad_row else ""
            out.print(f"BROKEN{where}: {v.reason}", markup=False)
        return 0 if v.ok else 1
    _existing_db("--db", args.db)
    try:
        results = _run_store(args.db, _verify_db(args.db, args.tenant), read_only=True)
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - exit 1 means "broken" here, nothing else
        raise UsageError("--db", f"cannot read {_redact_url(args.db)}: "
                                 f"{type(exc).__name__}: {exc}") from None
    if args.json:
        out.json(results)
    else:
        for r in results:
            if r["ok"]:
                out.print(f"OK: tenant {r['tenant_id']}: {r['count']} event(s), chain "
                          f"intact (head {r['head'][:16]}…)", markup=False)
            else:
                out.print(f"BROKEN: tenant {r['tenant_id']} at chain_index "
                          f"{r['first_bad_index']}: {r['reason']}", markup=False)
    return 0 if all(r["ok"] for r in results) else 1


async def _verify_db(db: str, tenant: str | None) -> list[dict[str, Any]]:
    from p402_server.ledger import open_store

    store = await open_store(db, create=False)
    try:
        tenants = [tenant] if tenant else [t.tenant_id for t in await store.list_tenants()]
        if tenant and await store.get_tenant(tenant) is None:
            raise UsageError("--tenant", f"no tenant {tenant!r} in the database")
        out = []
        for t in tenants:
            r = await store.verify_chain(t)
            out.append({"tenant_id": t, "ok": r.ok, "count": r.count, "head": r.head,
                        "first_bad_index": r.first_bad_index, "reason": r.reason})
        return out
    finally:
        await store.close()


def cmd_contents_purge(args: argparse.Namespace, out: Output) -> int:
    async def purge() -> int:
        from p402_server.ledger import open_store

        store = await open_store(args.db, create=False)
        try:
            return await store.purge_contents(time.time_ns() // 1_000_000)
        finally:
            await store.close()

    _existing_db("--db", args.db)
    n = _run_store(args.db, purge(), read_only=True)
    if args.json:
        out.json({"purged": n})
    else:
        out.print(f"Purged {n} content row(s) past their retention.")
    return 0


def _export_header() -> list[str]:
    """The CSV header of an empty export (same columns as Event.to_flat())."""
    from p402.v1 import meter_pb2
    from p402_client import _convert

    return list(_convert.event(meter_pb2.Event()).to_flat())


def add_receipts(sub) -> None:
    """`p402 receipts` and its flags."""
    rs = command_group(sub, "receipts", help="signed receipts of ledger events", **_fmt(
        "Signed receipts: one event as a compact JSON document signed with the tenant's "
        "evidence key (no content, ever). Anyone checks one offline with the public "
        "key set alone.",
        "p402 receipts get evt_01J… > r.json && p402 receipts verify r.json --keys keys.json"))
    p = rs.add_parser("get", help="print an event's receipt", **_fmt(
        "Print the signed receipt of a committed event (read scope).",
        "p402 receipts get evt_01J… > receipt.json"))
    p.add_argument("event_id")
    _remote(p)
    p.set_defaults(func=cmd_receipts_get)
    p = rs.add_parser("verify", help="check a receipt offline", **_fmt(
        "Check a receipt against a public key set: exit 0 when valid, 1 when altered "
        "or signed by a key not in the set, 2 on bad usage (unreadable file or keys). "
        "Needs no server and no API key.",
        "p402 receipts verify receipt.json --keys keys.json\n"
        "  p402 receipts verify receipt.json --keys "
        "'http://127.0.0.1:4021/.well-known/p402-keys.json?tenant=t_01J…'"))
    p.add_argument("file", metavar="FILE", help="the receipt (JSON), or - for stdin")
    p.add_argument("--keys", required=True, metavar="FILE|URL",
                   help="the public key set: a JSON file, or an http(s) URL")
    _json_flag(p)
    p.set_defaults(func=cmd_receipts_verify)


def add_statements(sub) -> None:
    """`p402 statements` and its flags."""
    ss2 = command_group(sub, "statements", help="closed monthly statements per customer", **_fmt(
        "Statements: a month's spend of one customer, closed once and signed with the "
        "tenant's evidence key (lines by feature and model, totals of cost and revenue, "
        "the ledger range it covers). Closing again gives the same statement; events "
        "that arrive late for a closed month go into the next statement as adjustments.",
        "p402 statements close --period 2026-11 --format csv"))
    p = ss2.add_parser("close", help="close a month (admin)", **_fmt(
        "Close a month (UTC, YYYY-MM) that has ended, for one customer or every customer "
        "with spend in it; prints the statements (JSON list, or CSV).",
        "p402 statements close --period 2026-11 --customer acme"))
    p.add_argument("--period", required=True, help="the month, YYYY-MM (UTC)")
    p.add_argument("--customer", default=None, help="one customer (default: every one)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    _remote(p)
    p.set_defaults(func=cmd_statements_close)
    p = ss2.add_parser("show", help="print a closed statement", **_fmt(
        "Print one closed statement (JSON, or CSV).",
        "p402 statements show --period 2026-11 --customer acme > st.json"))
    p.add_argument("--period", required=True)
    p.add_argument("--customer", required=True)
    p.add_argument("--format", choices=("json", "csv"), default="json")
    _remote(p)
    p.set_defaults(func=cmd_statements_show)
    p = ss2.add_parser("verify", help="check a statement", **_fmt(
        "Check a statement: its signature against a public key set (--keys, offline), "
        "and with --export against an export of the ledger (`p402 export`: its chain "
        "and digest checked, every line recomputed from its rows); or, with --ledger, "
        "against the server's ledger. Exit 0 valid, 1 altered or not backed by the "
        "ledger or export, 2 bad usage.",
        "p402 statements verify st.json --keys keys.json --export ledger.jsonl\n"
        "  p402 statements verify st.json --ledger"))
    p.add_argument("file", metavar="FILE", help="the statement (JSON), or - for stdin")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keys", metavar="FILE|URL", help="the public key set (offline check)")
    g.add_argument("--ledger", action="store_true",
                   help="recompute it from the server's ledger (read scope)")
    p.add_argument("--export", metavar="FILE", default=None,
                   help="with --keys: recompute it from this export (jsonl, csv or focus)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_statements_verify)


def add_billing(sub) -> None:
    """`p402 billing` and its flags."""
    bs2 = command_group(sub, "billing", help="usage events for billing systems", **_fmt(
        "Billing exports: a month's (or a time range's) ledger events as Stripe Billing "
        "meter events, OpenMeter CloudEvents or Lago events, one per event that cost or "
        "sold something, keyed by the event id so re-exporting never bills twice "
        "(formats: server/p402_server/ledger/billing.py). JSON lines on stdout or --output.",
        "p402 billing export --period 2026-11 --format stripe --output meter_events.jsonl"))
    p = bs2.add_parser("export", help="export a month's events (read scope)", **_fmt(
        "Export a month's events (by event time, UTC), or exactly the events a closed "
        "statement covers (its lines and adjustments), for billing.",
        "p402 billing export --period 2026-11 --customer acme --format openmeter\n"
        "  p402 billing export --statement st.json --format stripe"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--period", help="the month, YYYY-MM (UTC)")
    g.add_argument("--statement", metavar="FILE",
                   help="a statement (JSON, `p402 statements show`): its events")
    p.add_argument("--customer", default=None, help="one customer (default: every one)")
    p.add_argument("--format", required=True, choices=("stripe", "openmeter", "lago"))
    p.add_argument("--name", default="", help="meter event name / CloudEvents type / "
                                              "Lago code (a default per format)")
    p.add_argument("--value", default="revenue", choices=("revenue", "cost"),
                   help="Stripe's value: revenue (default) or cost, in micro-USD")
    p.add_argument("--customer-map", default=None, metavar="FILE",
                   help="JSON {p402 customer: billing system customer id}")
    p.add_argument("--output", "-o", default="-", help="a file (default stdout)")
    _remote(p)
    p.set_defaults(func=cmd_billing_export)


def add_events(sub) -> None:
    """`p402 events` and its flags."""
    # events
    p = sub.add_parser("events", help="recent ledger events", **_fmt(
        "Recent ledger events, newest first.",
        "p402 events --since 24h --customer acme --limit 50"))
    _filters(p)
    p.add_argument("--limit", default="20", help="at most this many events (default 20)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_events)


def add_spend(sub) -> None:
    """`p402 spend` and its flags."""
    # spend
    p = sub.add_parser("spend", help="spend grouped by owner, model, time …", **_fmt(
        "Spend grouped by the given keys, highest cost first, with a totals row. "
        f"Keys: {', '.join(GROUP_KEYS)}.",
        "p402 spend --by customer,feature --since 7d"))
    p.add_argument("--by", default="customer",
                   help="comma-separated group keys (default customer)")
    _filters(p)
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_spend)


def add_export(sub) -> None:
    """`p402 export` and its flags."""
    # export
    p = sub.add_parser("export", help="export events as CSV, JSONL or FinOps FOCUS",
                       **_fmt(
        "Every matching event in ledger order: every economic field, the hash chain "
        "(chain_index, prev_chain_hash, chain_hash) and no content. The export ends "
        "with a digest signed by the tenant's evidence key: the last line of a JSONL "
        "file ({\"digest\": ...}); for CSV and FOCUS files a sidecar FILE.digest.json "
        "(on stdout with --digest: a trailing '# digest {...}' line). Check it with "
        "`p402 verify --file`.",
        "p402 export --format focus --since 30d --output events.csv"))
    p.add_argument("--format", default="csv", choices=("csv", "jsonl", "focus"),
                   type=str.lower)
    p.add_argument("--output", "-o", default="-", help="file to write (default stdout)")
    p.add_argument("--digest", action=argparse.BooleanOptionalAction, default=None,
                   help="write the signed digest (default: yes to a file, no to stdout)")
    _filters(p)
    _remote(p)
    p.set_defaults(func=cmd_export)


def add_verify(sub) -> None:
    """`p402 verify` and its flags."""
    # verify
    p = sub.add_parser("verify", help="check the ledger's hash chain or an export",
                       **_fmt(
        "Check the hash chain of every tenant in a database (--db), or of an export "
        "file and its signed digest (--file). Names the first bad position. Exit 0 "
        "intact, 1 broken, 2 bad input (a missing file or database, or one that "
        "cannot be read: never created by this command).",
        "p402 verify --file events.jsonl"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db", help="SQLAlchemy URL of a P402 database")
    g.add_argument("--file", help="an export file (csv, jsonl or focus)")
    p.add_argument("--tenant", help="only this tenant (with --db)")
    p.add_argument("--public-key", help="hex Ed25519 key the digest must be signed by "
                                        "(Settings.evidence_public_key); default: the "
                                        "key named in the digest")
    _json_flag(p)
    p.set_defaults(func=cmd_verify)


def add_contents(sub) -> None:
    """`p402 contents` and its flags."""
    cs = command_group(sub, "contents", help="kept prompts and responses", **_fmt(
        "Content kept under redacted_trace / full_trace lives in its own table with a "
        "retention period; the server purges it in the background.",
        "p402 contents purge --db sqlite:///p402.db"))
    p = cs.add_parser("purge", help="delete content past its retention now", **_fmt(
        "Delete every kept prompt/response whose retention has passed.",
        "p402 contents purge --db sqlite:///p402.db"))
    p.add_argument("--db", default=os.environ.get("P402_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL (env P402_DB; default {DEFAULT_DB})")
    _json_flag(p)
    p.set_defaults(func=cmd_contents_purge)

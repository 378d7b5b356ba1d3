"""`p402 demo`: a self-contained tour of P402 on a temporary SQLite ledger.

Owns the demo scenario, and only that: it starts a real server in this process
(`server.create_server` on a throw-away SQLite file unless --db is given), creates a
tenant, budgets and policy rules, drives a seeded, realistic mix of Authorize /
Record / Release through the Python client (`AsyncP402Client`, exactly what a
gateway uses), then prints the ledger and the spend and how to talk to the server.

The mix is deterministic for a seed (customers, features, models, sizes, outcomes
and the order of calls); only timestamps and ids differ between runs. It shows each
decision, ALLOW, WARN and DENY: a HARD monthly budget, small SOFT daily budgets per
feature that the busier features cross (WARN, budget.exceeded on a SOFT budget: the
call goes ahead), a tiny HARD trial budget that runs out (DENY, budget.exceeded),
REQUIRE_OWNERS customer (policy.owner_missing), a RATE_LIMIT (policy.rate_limited),
a Record retried with the same event_id (counted once), a released reservation,
failed provider calls and meter-only Records. With `http` the dashboard is served
too, and the summary prints its URL and a read key to sign in with.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CUSTOMERS = ("acme", "globex", "initech", "umbrella")
FEATURES = ("chat", "summarize", "search", "code-review")
# Models of the shipped catalog, cheap to expensive; weights favour the cheap ones.
MODELS = (("gpt-4.1-mini", "openai", 5), ("claude-haiku-4-5", "anthropic", 3),
          ("gemini/gemini-2.5-flash", "gemini", 2), ("gpt-4o", "openai", 2),
          ("claude-sonnet-4-5", "anthropic", 2))
EMBEDDING_MODEL = ("text-embedding-3-small", "openai")
# What the tenant charges its customers per successful call, per feature (nano-USD),
# so the spend table can show margins.
REVENUE_NANOS = {"chat": 6_000_000, "summarize": 4_000_000, "code-review": 25_000_000}
CALLS = 64
FEATURE_DAILY_NANOS = 50_000_000  # $0.05 a day per feature, SOFT


@dataclass
class Tally:
    """What the tour did, for the summary."""

    authorized: Counter = field(default_factory=Counter)  # decision -> n
    reasons: Counter = field(default_factory=Counter)
    recorded: int = 0
    outcomes: Counter = field(default_factory=Counter)
    duplicate_retry: Any = None
    released: str = ""
    denied: int = 0


def _pick_models(catalog_models: set[str] | None) -> list[tuple[str, str, int]]:
    """The demo's models that the server's catalog prices (falls back to all)."""
    if not catalog_models:
        return list(MODELS)
    usable = [m for m in MODELS if m[0] in catalog_models]
    if usable:
        return usable
    # A catalog without any of our names: take a few of its own, cheapest first.
    return [(m, "", 1) for m in sorted(catalog_models)[:4]]


async def _setup(p402: Any) -> None:
    """Budgets and rules of the demo tenant."""
    usd = 1_000_000_000
    await p402.put_budget("acme-monthly", limit_nanos=50 * usd, period="MONTH",
                          soft_limit_nanos=40 * usd, enforcement="HARD",
                          scope={"customer": "acme"})
    # Small enough that chat, search and summarize cross them during the tour: from
    # then on their calls are answered WARN (and still made).
    for feature in FEATURES:
        await p402.put_budget(f"{feature}-daily", limit_nanos=FEATURE_DAILY_NANOS,
                              period="DAY", enforcement="SOFT", scope={"feature": feature})
    # A free trial that runs out during the tour: shows budget.exceeded.
    await p402.put_budget("initech-trial", limit_nanos=usd // 25, period="TOTAL",
                          enforcement="HARD", scope={"customer": "initech"})
    await p402.put_policy_rule("require-customer", "REQUIRE_OWNERS",
                               require_owners=["customer"],
                               message="every call must name its customer")
    await p402.put_policy_rule("search-rate", "RATE_LIMIT", owners={"feature": "search"},
                               rate_limit=4, rate_unit="REQUESTS", window_seconds=60,
                               per="customer",
                               message="search: 4 calls a minute per customer")


async def _one_call(p402: Any, rng: random.Random, tally: Tally, models: list,
                    *, customer: str, feature: str) -> None:
    model, provider, _w = rng.choices(models, weights=[m[2] for m in models])[0]
    prompt_bytes = rng.randint(400, 24_000)
    max_out = rng.choice((256, 512, 1024, 2048))
    owners = {"customer": customer, "feature": feature} if customer else {"feature": feature}
    auth = await p402.authorize(model, provider=provider, owners=owners,
                                labels={"env": "prod"}, input_bytes=prompt_bytes,
                                max_output_tokens=max_out)
    tally.authorized[auth.decision.value] += 1
    tally.reasons.update(auth.reasons)
    if auth.denied:
        tally.denied += 1
        return
    # The provider answers: ~4 bytes a token in, up to the cap out; some calls fail.
    roll = rng.random()
    outcome = "SUCCESS" if roll < 0.88 else ("PROVIDER_ERROR" if roll < 0.95 else "TIMEOUT")
    input_tokens = max(1, prompt_bytes // 4 - rng.randint(0, prompt_bytes // 40))
    cached = input_tokens // 2 if rng.random() < 0.3 else 0
    cap = auth.output_token_cap or max_out
    output_tokens = rng.randint(cap // 8, cap) if outcome == "SUCCESS" else 0
    revenue = REVENUE_NANOS.get(feature, 0) if outcome == "SUCCESS" else 0
    await p402.record(auth.reservation_id, input_tokens=input_tokens,
                      cached_input_tokens=cached, output_tokens=output_tokens,
                      outcome=outcome, input_bytes=prompt_bytes, revenue_nanos=revenue)
    tally.recorded += 1
    tally.outcomes[outcome] += 1


async def _traffic(p402: Any, rng: random.Random, models: list, catalog: set[str]
                   ) -> Tally:
    from p402_client import new_ulid

    tally = Tally()
    for _ in range(CALLS):
        customer = rng.choices(CUSTOMERS, weights=(5, 3, 2, 2))[0]
        feature = rng.choices(FEATURES, weights=(5, 3, 3, 1))[0]
        await _one_call(p402, rng, tally, models, customer=customer, feature=feature)
    # A burst of searches from one customer: the rate limit answers DENY.
    for _ in range(6):
        await _one_call(p402, rng, tally, models, customer="globex", feature="search")
    # An internal job that forgot to say whose work it is: REQUIRE_OWNERS denies it.
    await _one_call(p402, rng, tally, models, customer="", feature="summarize")
    # initech keeps going past its trial budget.
    for _ in range(4):
        await _one_call(p402, rng, tally, models, customer="initech", feature="code-review")

    # A gateway whose Record timed out on its side retries with the same event_id:
    # the ledger counts it once and says so.
    model, provider, _w = models[0]
    auth = await p402.authorize(model, provider=provider,
                                owners={"customer": "acme", "feature": "chat"},
                                input_bytes=3_000, max_output_tokens=400)
    tally.authorized[auth.decision.value] += 1
    if auth.allowed:
        first = await p402.record(auth.reservation_id, event_id=new_ulid(),
                                  input_tokens=700, output_tokens=300,
                                  revenue_nanos=REVENUE_NANOS["chat"])
        again = await p402.record(auth.reservation_id, event_id=first.event_id,
                                  input_tokens=700, output_tokens=300,
                                  revenue_nanos=REVENUE_NANOS["chat"])
        tally.recorded += 1
        tally.outcomes["SUCCESS"] += 1
        tally.duplicate_retry = (first, again)

    # A call the gateway decided not to make after all: the hold is released.
    auth = await p402.authorize(model, provider=provider,
                                owners={"customer": "umbrella", "feature": "chat"},
                                input_bytes=8_000, max_output_tokens=1024)
    tally.authorized[auth.decision.value] += 1
    if auth.allowed:
        await p402.release(auth.reservation_id)
        tally.released = auth.reservation_id

    # Meter-only: an embedding batch recorded after the fact, no reservation.
    model, provider = EMBEDDING_MODEL if EMBEDDING_MODEL[0] in catalog else models[0][:2]
    await p402.record(model=model, provider=provider,
                      owners={"customer": "globex", "feature": "search"},
                      input_tokens=12_000, outcome="SUCCESS")
    tally.recorded += 1
    tally.outcomes["SUCCESS"] += 1
    return tally


async def _wait_for_ledger(p402: Any, denied: int, timeout_s: float = 3.0) -> None:
    """Denied decisions are written behind the response; wait until they are in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = await p402.query(group_by=["decision"], page_size=100)
        seen = sum(r.event_count for r in page.items if r.group.get("decision") == "DENY")
        if seen >= denied:
            return
        await asyncio.sleep(0.05)


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def _catalog_models(p402: Any) -> set[str]:
    try:
        return {p.model async for p in p402.paginate(p402.list_prices)}
    except Exception:  # noqa: BLE001 - only to choose models; the defaults still work
        return set()


async def _run(db: str | None, listen: str, keep_running: bool, seed: int, out: Any,
               http: str | None = None) -> int:
    from rich.markup import escape

    from p402_client import AsyncP402Client
    from p402_server.cli.output import EVENT_COLUMNS, EVENT_DROP, event_row, print_spend, usd_short
    from p402_server.ledger import open_store
    from p402_server.server import create_server, init_tenant

    tmpdir = None
    if db is None:
        tmpdir = tempfile.mkdtemp(prefix="p402-demo-")
        db = f"sqlite+aiosqlite:///{tmpdir}/demo.db"
    store = await open_store(db)
    server = None
    try:
        tenant, admin_key = await init_tenant(store, "demo")
        server, port = create_server(listen, store=store, http=http)
        await server.start()
        host = _host_port(listen)[0] or "127.0.0.1"
        target = f"{host}:{port}"
        out.print(f"[bold]P402 demo[/bold]: server on {target}, ledger {escape(db)}")

        rng = random.Random(seed)
        async with AsyncP402Client(target, api_key=admin_key, timeout=10.0) as admin:
            await _setup(admin)
            meter = await admin.create_key("demo-gateway", ["meter", "read"])
            reader = (await admin.create_key("demo-dashboard", ["read"])
                      if server.dashboard is not None else None)
            catalog = await _catalog_models(admin)
            models = _pick_models(catalog)
        out.print("Tenant [bold]demo[/bold]: budgets acme-monthly ($50 HARD), "
                  f"<feature>-daily ({usd_short(FEATURE_DAILY_NANOS)} SOFT each), "
                  "initech-trial ($0.04 HARD); rules "
                  "require-customer (REQUIRE_OWNERS), search-rate (RATE_LIMIT 4/min "
                  "per customer).")

        started = time.monotonic()
        async with AsyncP402Client(target, api_key=meter.api_key, timeout=10.0) as p402:
            tally = await _traffic(p402, rng, models, catalog)
            await _wait_for_ledger(p402, tally.denied)
            elapsed = time.monotonic() - started
            ledger = (await p402.query(page_size=15)).items
            by_customer = [r async for r in p402.iter_query(group_by=["customer"],
                                                            page_size=1000)]
            by_feature = [r async for r in p402.iter_query(group_by=["feature"],
                                                           page_size=1000)]

        total_auth = sum(tally.authorized.values())
        decisions = ", ".join(f"{n} {d.lower()}" for d, n in sorted(tally.authorized.items()))
        reasons = ", ".join(f"{r} ×{n}" for r, n in tally.reasons.most_common()) or "none"
        out.print(f"\nSent {total_auth} Authorize ({decisions}) and {tally.recorded} Record "
                  f"in {elapsed:.2f}s through the Python client.")
        out.print(f"Reasons: {reasons}.", markup=False)
        if tally.duplicate_retry:
            first, again = tally.duplicate_retry
            out.print(f"Retried Record {first.event_id}: duplicate={again.duplicate}, "
                      f"cost {usd_short(again.cost_nanos)} counted once.")
        if tally.released:
            out.print(f"Released reservation {tally.released} (the call was never made).")

        out.print()
        out.table("Ledger: the 15 most recent events", EVENT_COLUMNS,
                  (event_row(e) for e in ledger), drop=EVENT_DROP)
        out.print()
        print_spend(out, "Spend by customer", ["customer"], by_customer)
        out.print()
        print_spend(out, "Spend by feature", ["feature"], by_feature)

        running = keep_running
        out.print("\n[bold]Talk to the server[/bold]" + ("" if running else
                  " (it stops when the demo ends; rerun with --keep-running --http "
                  "127.0.0.1:4021 to keep it and browse the ledger)"))
        out.print(f"  export P402_TARGET={target}\n"
                  f"  export P402_API_KEY={admin_key}   # admin key of tenant {tenant}\n"
                  "  p402 spend --by customer,feature --since 1h\n"
                  "  p402 events --limit 20\n"
                  "  p402 budgets list\n"
                  "  p402 export --format csv --output events.csv\n"
                  f"  grpcurl -plaintext -H 'authorization: Bearer {admin_key}' {target} "
                  "p402.v1.MeterService/Ping", markup=False)
        if server.dashboard is not None:
            out.print(f"\n[bold]Dashboard[/bold]: {server.dashboard.url}meter/events\n"
                      f"  sign in with the read key {reader.api_key}"
                      + ("" if running else "\n  (it stops with the demo; add "
                         "--keep-running to browse it)"))
        if keep_running:
            out.print("\nServing until Ctrl-C …")
            await _until_signal()
        return 0
    finally:
        if server is not None:
            await server.stop(2.0)
        await store.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run_workflows(db: str | None, listen: str, names: list[str], out: Any,
                         results: list | None = None, workdir: str | None = None) -> int:
    """The vertical workflows (demo_workflows.py), each on a tenant of its own, on
    one server started here like the tour's. Files they write go to `workdir`, by
    default a temporary directory removed at the end (with the ledger, unless --db)."""
    from p402_server.cli.demo_workflows import Context, run_workflow
    from p402_server.ledger import open_store
    from p402_server.server import create_server

    tmpdir = None
    if db is None or workdir is None:
        tmpdir = tempfile.mkdtemp(prefix="p402-demo-")
    if db is None:
        db = f"sqlite+aiosqlite:///{tmpdir}/demo.db"
    store = await open_store(db)
    server = None
    try:
        server, port = create_server(listen, store=store)
        await server.start()
        host = _host_port(listen)[0] or "127.0.0.1"
        ctx = Context(store=store, target=f"{host}:{port}", out=out,
                      workdir=workdir or tmpdir)
        out.print(f"[bold]P402 demo workflows[/bold]: server on {ctx.target}, ledger {db}")
        for name in names:
            out.print()
            res = await run_workflow(name, ctx)
            if results is not None:
                results.append(res)
        return 0
    finally:
        if server is not None:
            await server.stop(2.0)
        await store.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def run(*, db: str | None, listen: str, keep_running: bool, seed: int, out: Any,
        workflow: str | None = None, http: str | None = None) -> int:
    """Run the tour, or with `workflow` ("support", "code-review", "extraction",
    "finance" or "all") the vertical workflows; returns the exit code. `http`
    ("HOST:PORT") also serves the dashboard during the tour."""
    if workflow:
        from p402_server.cli.demo_workflows import WORKFLOWS

        names = list(WORKFLOWS) if workflow == "all" else [workflow]
        return asyncio.run(_run_workflows(db, listen, names, out))
    return asyncio.run(_run(db, listen, keep_running, seed, out, http))


__all__ = ["run"]

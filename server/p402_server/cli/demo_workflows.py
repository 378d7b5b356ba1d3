"""`p402 demo --workflow …`: four vertical workflows, each on a tenant of its own.

Owns the four scenarios and only them; `demo.py` starts the server and calls
`run_workflow(name, ctx)`. Each workflow drives the live server through the SDK —
`AsyncP402Client.meter()` around every call (authorize on enter, record on exit,
the denial as `BudgetDenied` / `PolicyDenied`) — and a deterministic provider
stand-in, then prints the calls it made and the spend tables read back from the
ledger, and returns them (`WorkflowResult`) so tests can compare them with the
ledger.

1. support — a SaaS support assistant: per-customer attribution and margin
   (revenue per conversation) by customer and feature.
2. code-review — an engineering code-review bot: a department budget with a soft
   limit and an employee budget: first ALLOW, then WARN (budget.soft_limit), then
   DENY (budget.exceeded).
3. extraction — a document-extraction batch: failed calls retried with `attempt`
   (1 for the first try, 2 for the retry) / `retry_of`; documents sent twice found
   by their content fingerprint
   (privacy mode fingerprint_only: the content is hashed, never kept); near the
   budget's end the tenant's `allow_clamp` setting turns a DENY into an ALLOW with a
   smaller output cap (budget.clamped).
4. finance — a finance team's private gateway (privacy mode private_gateway): the
   gateway is registered, signs every report with its secret (HMAC-SHA256,
   `P402Client(gateway_id=…, gateway_secret=…)`), and its events are ATTESTED; an
   unsigned report is refused (UNAUTHENTICATED, SIGNATURE_MISSING) and leaves
   nothing; then an evidence export of the ledger (`p402 export`, hash-chained)
   checked with `p402 verify`.

The provider stand-in: input tokens = ceil(prompt bytes / 4); output tokens =
min(output cap, what the task needs); a scripted set of calls fails. Everything is
deterministic except ids and timestamps.
"""
from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from typing import Any

WORKFLOWS = ("support", "code-review", "extraction", "finance")
USD = 1_000_000_000


class ProviderError(Exception):
    """The stand-in provider failed this call (HTTP 500 upstream)."""


class StandinProvider:
    """A deterministic LLM provider: usage is a pure function of the call."""

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, prompt: str, *, cap: int, wanted: int, fail: bool = False
                 ) -> dict[str, int]:
        self.calls += 1
        if fail:
            raise ProviderError("upstream 500")
        return {"input_tokens": max(1, -(-len(prompt.encode()) // 4)),
                "output_tokens": min(cap, wanted) if cap else wanted}


@dataclass
class WorkflowResult:
    """What a workflow printed: its tenant, the calls and the spend tables."""

    name: str
    tenant_id: str
    calls: list[dict] = field(default_factory=list)  # one per metered call, in order
    tables: dict[str, tuple[list[str], list]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What demo.py hands a workflow; `workdir` is where a workflow may write files
    (the finance export), removed by demo.py when the run ends unless given."""

    store: Any
    target: str
    out: Any
    workdir: str
    provider: StandinProvider = field(default_factory=StandinProvider)


async def _tenant(ctx: Context, name: str, *, signed: bool = False):
    """A fresh tenant -> (tenant_id, admin client, meter client); the admin key is
    kept as `admin.demo_api_key` (the finance workflow hands it to the CLI) and the
    meter key as `meter.demo_api_key`. `signed`: the tenant's default privacy mode
    becomes private_gateway, a gateway is registered, and the meter client signs
    every report with its secret (`meter.signer`)."""
    from p402_client import AsyncP402Client
    from p402_server.server import init_tenant

    tenant_id, admin_key = await init_tenant(ctx.store, name)
    admin = AsyncP402Client(ctx.target, api_key=admin_key, timeout=10.0)
    admin.demo_api_key = admin_key
    key = await admin.create_key(f"{name}-gateway", ["meter", "read"])
    signing: dict[str, Any] = {}
    if signed:
        await admin.update_settings(default_privacy_mode="PRIVATE_GATEWAY")
        gw = await admin.register_gateway(f"gw_{name}", name=f"{name} gateway")
        signing = {"gateway_id": gw.gateway.gateway_id, "gateway_secret": gw.secret}
    meter = AsyncP402Client(ctx.target, api_key=key.api_key, timeout=10.0, **signing)
    meter.demo_api_key = key.api_key
    return tenant_id, admin, meter


async def metered_call(p402: Any, provider: StandinProvider, model: str, prompt: str, *,
                       owners: dict, wanted: int, max_output_tokens: int = 0,
                       revenue_nanos: int = 0, fail: bool = False, **kw: Any) -> dict:
    """One provider call inside `p402.meter()`; returns what happened, as a row."""
    from p402_client import BudgetDenied, PolicyDenied

    row = {"owners": dict(owners), "labels": dict(kw.get("labels") or {}), "model": model, "decision": "", "reasons": (),
           "cap": 0, "outcome": "", "event_id": "", "cost_nanos": 0, "evidence": "",
           "attempt": kw.get("attempt", 0), "retry_of": kw.get("retry_of", "")}
    if "content" not in kw:  # else the server measures the content itself
        kw["input_bytes"] = len(prompt.encode())
    m = p402.meter(model, owners=owners, max_output_tokens=max_output_tokens,
                   revenue_nanos=revenue_nanos, **kw)
    try:
        async with m:
            auth = m.authorization
            row.update(decision=auth.decision.value, reasons=tuple(auth.reasons),
                       cap=m.output_token_cap)
            usage = provider.complete(prompt, cap=m.output_token_cap, wanted=wanted,
                                      fail=fail)
            m.set_usage(**usage)
        row["outcome"] = "SUCCESS"
    except (BudgetDenied, PolicyDenied) as denied:
        row.update(decision="DENY", reasons=tuple(denied.reasons), outcome="DENIED")
        return row
    except ProviderError:
        row["outcome"] = "PROVIDER_ERROR"
    result = getattr(m, "result", None)
    if result is not None and hasattr(result, "event_id"):
        row.update(event_id=result.event_id, cost_nanos=result.cost_nanos,
                   evidence=result.evidence.value)
    return row


async def _spend(p402: Any, group_by: list[str]) -> list:
    return [r async for r in p402.iter_query(group_by=group_by, page_size=1000)]


async def _print_tables(ctx: Context, res: WorkflowResult, p402: Any,
                        tables: list[tuple[str, list[str]]]) -> None:
    from p402_server.cli.output import print_spend

    for title, group_by in tables:
        rows = await _spend(p402, group_by)
        res.tables[title] = (group_by, rows)
        ctx.out.print()
        print_spend(ctx.out, title, group_by, rows)


def _print_calls(ctx: Context, res: WorkflowResult, title: str, who: str) -> None:
    from p402_server.amounts import Money

    ctx.out.table(title, ["#", who, "model", "decision", ("cap", "right"), "outcome",
                          ("cost", "right"), "evidence", "reasons"],
                  ([i + 1, c["owners"].get(who) or c["labels"].get(who, ""), c["model"],
                    c["decision"].lower(), c["cap"] or "-", c["outcome"].lower(),
                    Money(c["cost_nanos"]) if c["event_id"] else "-",
                    (c["evidence"] or "-").lower(),
                    ",".join(c["reasons"])] for i, c in enumerate(res.calls)),
                  drop=("evidence", "cap", "outcome", "reasons"))


async def _wait_denied(p402: Any, n: int, timeout: float = 3.0) -> None:
    """Denied events are written behind the decision: wait until the ledger has them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        page = await p402.query(group_by=["decision"], page_size=10)
        if sum(r.event_count for r in page.items if r.group.get("decision") == "DENY") >= n:
            return
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ 1. support


SUPPORT_CUSTOMERS = (("acme", 4), ("globex", 3), ("initech", 2))
# What the SaaS charges its customers: per conversation, and per ticket summary.
REVENUE_CHAT = 30_000_000  # $0.03
REVENUE_SUMMARY = 10_000_000  # $0.01


async def support(ctx: Context) -> WorkflowResult:
    tenant_id, admin, p402 = await _tenant(ctx, "support-saas")
    res = WorkflowResult("support", tenant_id)
    try:
        await admin.put_budget("support-monthly", limit_nanos=100 * USD, period="MONTH",
                               scope={"feature": "support-chat"})
        await admin.put_policy_rule("need-customer", "REQUIRE_OWNERS",
                                    require_owners=["customer"])
        ctx.out.print("[bold]1. SaaS support assistant[/bold]: every conversation is "
                      "attributed to its customer; revenue per conversation gives the "
                      "margin per customer and feature.")
        for customer, conversations in SUPPORT_CUSTOMERS:
            for n in range(conversations):
                prompt = f"[{customer}] ticket {n}: " + "My invoice looks wrong. " * (8 + n)
                res.calls.append(await metered_call(
                    p402, ctx.provider, "gpt-4.1-mini", prompt, wanted=180 + 20 * n,
                    max_output_tokens=400, revenue_nanos=REVENUE_CHAT,
                    owners={"customer": customer, "feature": "support-chat"}))
                # Every second conversation also gets a summary for the agent.
                if n % 2 == 0:
                    res.calls.append(await metered_call(
                        p402, ctx.provider, "gpt-4o-mini", prompt, wanted=60,
                        max_output_tokens=120, revenue_nanos=REVENUE_SUMMARY,
                        owners={"customer": customer, "feature": "ticket-summary"}))
        _print_calls(ctx, res, "Calls", "customer")
        await _print_tables(ctx, res, p402, [("Margin by customer", ["customer"]),
                                             ("Margin by feature", ["feature"])])
    finally:
        await p402.close()
        await admin.close()
    return res


# ------------------------------------------------------------------ 2. code review


async def code_review(ctx: Context) -> WorkflowResult:
    tenant_id, admin, p402 = await _tenant(ctx, "eng-code-review")
    res = WorkflowResult("code-review", tenant_id)
    try:
        # Sized so the run shows each decision: claude-sonnet-4-5 reviews of ~9 KB
        # diffs cost about $0.01 each (estimate ~$0.013).
        await admin.put_budget("engineering-monthly", limit_nanos=USD, period="MONTH",
                               soft_limit_nanos=USD // 2, enforcement="HARD",
                               scope={"department": "engineering"})
        await admin.put_budget("alice-daily", limit_nanos=USD // 20, period="DAY",
                               soft_limit_nanos=USD // 40, enforcement="HARD",
                               scope={"employee": "alice"})
        ctx.out.print("[bold]2. Code-review bot[/bold]: department engineering ($1.00 a "
                      "month, soft limit $0.50) and employee alice ($0.05 a day, soft "
                      "limit $0.025). alice's reviews go from allow to warn to deny.")
        diff = "+    total = sum(line.amount for line in invoice.lines)\n" * 160
        for pr in range(8):
            res.calls.append(await metered_call(
                p402, ctx.provider, "claude-sonnet-4-5", f"Review PR #{pr}:\n{diff}",
                wanted=500, max_output_tokens=800,
                owners={"department": "engineering", "employee": "alice",
                        "feature": "code-review"}))
            if res.calls[-1]["decision"] == "DENY":
                break
        # bob still has room: the denial is alice's budget, not the department's.
        res.calls.append(await metered_call(
            p402, ctx.provider, "claude-sonnet-4-5", f"Review PR #100:\n{diff}",
            wanted=500, max_output_tokens=800,
            owners={"department": "engineering", "employee": "bob",
                    "feature": "code-review"}))
        await _wait_denied(p402, sum(c["decision"] == "DENY" for c in res.calls))
        _print_calls(ctx, res, "Reviews", "employee")
        await _print_tables(ctx, res, p402, [("Spend by employee", ["employee"]),
                                             ("Spend by decision", ["decision"])])
        ctx.out.table("Budgets", ["budget", ("limit", "right"), ("soft", "right"),
                                  ("committed", "right"), ("held", "right")],
                      _budget_rows(await admin.list_budgets()))
    finally:
        await p402.close()
        await admin.close()
    return res


def _budget_rows(page: Any) -> list[list]:
    from p402_server.amounts import Money

    rows = []
    for b in page.items:
        st = getattr(b, "status", None)
        rows.append([b.budget_id, Money(b.limit_nanos),
                     Money(b.soft_limit_nanos) if b.soft_limit_nanos else "-",
                     Money(st.committed_nanos) if st else "-",
                     Money(st.held_nanos) if st else "-"])
    return rows


# ------------------------------------------------------------------ 3. extraction


EXTRACTION_DOCS = 10
FAILING = {2, 5}  # documents whose first attempt fails at the provider
DUPLICATES = {7: 1, 9: 3}  # document 7 is document 1 sent again, 9 is 3
# gpt-4o, ~3 KB documents, 700 output tokens: about $0.0087 a document, an estimate of
# about $0.011 (1000 output tokens reserved). Sized so the last documents no longer
# fit their full estimate and are clamped.
EXTRACTION_BUDGET = 85 * USD // 1000


async def extraction(ctx: Context) -> WorkflowResult:
    from p402_client import P402Error

    tenant_id, admin, p402 = await _tenant(ctx, "doc-extraction")
    res = WorkflowResult("extraction", tenant_id)
    try:
        await admin.update_settings(allow_clamp=True)
        privacy = "FINGERPRINT_ONLY"
        try:
            await admin.update_settings(default_privacy_mode=privacy)
        except P402Error as exc:  # a server without fingerprint_only
            privacy = None
            res.notes.append(f"fingerprint_only not available here ({exc.message}): "
                             "duplicates are not detected in this run")
        # A budget that the batch nearly uses up: the last documents get a clamped
        # output cap instead of a denial.
        await admin.put_budget("extraction-batch", limit_nanos=EXTRACTION_BUDGET,
                               period="TOTAL",
                               scope={"workflow": "invoice-extraction"})
        ctx.out.print("[bold]3. Document-extraction batch[/bold]: retries attributed "
                      "(attempt, retry_of), duplicates found by content fingerprint, "
                      "and an output clamp near the budget's end (allow_clamp).")
        for i in range(EXTRACTION_DOCS):
            src = DUPLICATES.get(i, i)
            doc = (f"INVOICE {src:05d}\nVendor: Example Supplies Ltd\n"
                   + f"Line {src}: 12 x widget @ 3.50 EUR\n" * (80 + 2 * src))
            # One owner for the whole batch (duplicates are found per owner); the
            # document is a label.
            owners = {"workflow": "invoice-extraction", "task": "nightly-batch",
                      "feature": "extraction"}
            kw: dict[str, Any] = {"labels": {"doc": f"doc-{i}"}}
            if privacy:
                kw.update(content=doc, privacy_mode=privacy)
            call = await _extract(p402, ctx.provider, doc, owners, fail=i in FAILING,
                                  attempt=1, **kw)
            res.calls.append(call)
            if call["outcome"] == "PROVIDER_ERROR":
                # The retry is attempt 2 and names the failed attempt: finance sees
                # both, linked.
                res.calls.append(await _extract(p402, ctx.provider, doc, owners,
                                                attempt=2, retry_of=call["event_id"],
                                                **kw))
        _print_calls(ctx, res, "Documents", "doc")
        events = [e async for e in p402.iter_query(page_size=1000)]
        retries = [e for e in events if e.retry_of]
        dups = [e for e in events if getattr(e, "duplicate_of", "")]
        docs_by_event = {e.event_id: e.labels.get("doc", "") for e in events}
        ctx.out.print(f"\nRetries: {len(retries)} (" + ", ".join(
            f"{e.labels.get('doc')}: attempt {e.attempt}, retry of {e.retry_of}"
            for e in sorted(retries, key=_in_time))
            + ")", markup=False)
        if privacy:
            ctx.out.print(_duplicates_line(dups, docs_by_event), markup=False)
        clamped = [c for c in res.calls if "budget.clamped" in c["reasons"]]
        ctx.out.print(f"Clamped instead of denied: {len(clamped)} call(s)"
                      + (f", caps {[c['cap'] for c in clamped]}" if clamped else ""))
        for note in res.notes:
            ctx.out.print(f"Note: {note}", markup=False)
        await _wait_denied(p402, sum(c["decision"] == "DENY" for c in res.calls))
        await _print_tables(ctx, res, p402, [("Spend by outcome", ["outcome"]),
                                             ("Spend by decision", ["decision"])])
    finally:
        await p402.close()
        await admin.close()
    return res


def _in_time(e: Any) -> tuple[int, str]:
    return e.event_time_ms, e.event_id


def _duplicates_line(dups: list, docs_by_event: dict[str, str]) -> str:
    """Fingerprint matches, split: another document sent again ("doc-7 is doc-1
    again") and a retry re-sending its own document (a match by design)."""
    again, resent = [], []
    for e in sorted(dups, key=_in_time):
        doc = e.labels.get("doc", e.event_id)
        original = docs_by_event.get(e.duplicate_of, e.duplicate_of)
        if original == doc and e.retry_of:
            resent.append(doc)
        else:
            again.append(f"{doc} is {original} again")
    line = (f"Duplicates by fingerprint: {len(again)} document(s) sent twice ("
            + (", ".join(again) or "none") + ")")
    if resent:
        line += (f"; the {len(resent)} retr{'y' if len(resent) == 1 else 'ies'} "
                 f"re-sent their own document ({', '.join(resent)}) and match it too")
    return line + "."


async def _extract(p402: Any, provider: StandinProvider, doc: str, owners: dict, *,
                   fail: bool = False, **kw: Any) -> dict:
    return await metered_call(p402, provider, "gpt-4o", doc, owners=owners, wanted=700,
                              max_output_tokens=1000, fail=fail, **kw)


# ------------------------------------------------------------------ 4. finance


FINANCE_OWNERS = {"department": "finance", "workflow": "month-end-close"}


async def finance(ctx: Context) -> WorkflowResult:
    tenant_id, admin, p402 = await _tenant(ctx, "finance", signed=True)
    res = WorkflowResult("finance", tenant_id)
    try:
        await admin.put_budget("finance-monthly", limit_nanos=20 * USD, period="MONTH",
                               scope={"department": "finance"})
        ctx.out.print("[bold]4. Finance private gateway[/bold]: the finance team's own "
                      f"gateway ({p402.signer.gateway_id}, privacy mode private_gateway) "
                      "signs every report it sends (HMAC-SHA256 over the request, a "
                      "timestamp and a nonce); the server verifies each one and marks "
                      "its event ATTESTED. The ledger is then exported with its hash "
                      "chain and verified.")
        for employee, reports in (("dana", 3), ("eli", 2)):
            for n in range(reports):
                prompt = f"Reconcile ledger batch {n} for {employee}: " + "row;" * 900
                res.calls.append(await metered_call(
                    p402, ctx.provider, "gpt-4.1", prompt, wanted=400,
                    max_output_tokens=600,
                    owners={**FINANCE_OWNERS, "employee": employee}))
        _print_calls(ctx, res, "Signed reports", "employee")
        await _unsigned_is_refused(ctx, res, p402.demo_api_key)
        await _print_tables(ctx, res, p402, [("Spend by employee", ["employee"]),
                                             ("Spend by evidence", ["evidence"])])
        await _export_and_verify(ctx, res, admin)
    finally:
        await p402.close()
        await admin.close()
    return res


async def _unsigned_is_refused(ctx: Context, res: WorkflowResult, meter_key: str) -> None:
    """The same meter key without the gateway's secret: the report is refused before
    anything is settled (a meter-only record, so no reservation is left open)."""
    from p402_client import AsyncP402Client, Unauthenticated

    async with AsyncP402Client(ctx.target, api_key=meter_key, timeout=10.0) as unsigned:
        try:
            await unsigned.record(model="gpt-4.1", owners={**FINANCE_OWNERS,
                                                            "employee": "mallory"},
                                  input_tokens=1000, output_tokens=400)
        except Unauthenticated as exc:
            res.notes.append(f"unsigned report refused: {exc.reason}")
            ctx.out.print(f"\nAn unsigned report (employee mallory) is refused: "
                          f"UNAUTHENTICATED {exc.reason}; nothing reached the ledger.",
                          markup=False)
            return
    # Accepted would be a server bug: say so loudly (the test checks the note).
    res.notes.append("unsigned report ACCEPTED")
    ctx.out.print("\nAn unsigned report was ACCEPTED: private_gateway is not enforced.",
                  markup=False)


async def _export_and_verify(ctx: Context, res: WorkflowResult, admin: Any) -> None:
    """`p402 export` then `p402 verify --file`, through the command line itself, in
    its own process as a user would run it (this loop serves the server it talks
    to meanwhile)."""
    key = admin.demo_api_key
    path = os.path.join(ctx.workdir, "finance-evidence.jsonl")
    base = ["--target", ctx.target, "--api-key", key]
    ctx.out.print(f"\n$ p402 export --format jsonl --output {path}")
    rc = await _p402("export", *base, "--format", "jsonl", "--output", path)
    if rc != 0:
        res.notes.append(f"export failed (exit {rc})")
        return
    ctx.out.print(f"$ p402 verify --file {path}")
    rc = await _p402("verify", "--file", path)
    res.notes.append(f"verify exit {rc}")
    res.tables["export"] = (["path"], [path])


async def _p402(*argv: str) -> int:
    """Run `p402 ARGV...` (python -m p402_server.cli) and return its exit code; its
    output goes where this process's does."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "p402_server.cli",
                                                *argv)
    return await proc.wait()


RUNNERS = {"support": support, "code-review": code_review, "extraction": extraction,
           "finance": finance}


async def run_workflow(name: str, ctx: Context) -> WorkflowResult:
    if name not in RUNNERS:
        raise ValueError(f"workflow: {name!r} is not one of {', '.join(WORKFLOWS)}")
    return await RUNNERS[name](ctx)


__all__ = ["WORKFLOWS", "Context", "WorkflowResult", "StandinProvider", "run_workflow",
           "metered_call"]

"""`p402 demo --workflow …`: each workflow runs to completion against a live server,
and the tables it printed match the ledger, summed here from the raw events."""
from __future__ import annotations

import asyncio
import re
from collections import defaultdict

import pytest

from p402core import Decision, Evidence, Outcome, PrivacyMode

from p402_server.amounts import column_decimals, usd
from p402_server.cli import Output
from p402_server.cli.demo_workflows import (DUPLICATES, EXTRACTION_DOCS, FAILING,
                                        SUPPORT_CUSTOMERS)


class Recording(Output):
    """The CLI's Output, recording what it printed."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(record=True, width=220, highlight=False, soft_wrap=False,
                               file=open("/dev/null", "w"))

    def text(self) -> str:
        return self.console.export_text(clear=False)


async def run(tmp_path, name: str):
    from p402_server.cli.demo import _run_workflows

    out = Recording()
    results: list = []
    db = f"sqlite+aiosqlite:///{tmp_path}/demo.db"
    rc = await asyncio.wait_for(_run_workflows(db, "127.0.0.1:0", [name], out, results,
                                               workdir=str(tmp_path)), 120)
    assert rc == 0
    [res] = results
    return res, out.text(), db


async def ledger(db: str, tenant_id: str) -> list:
    from p402_server.ledger import open_store
    from p402_server.ledger.model import EventFilter

    store = await open_store(db)
    try:
        events, token = await store.query_events(tenant_id, EventFilter(), page_size=1000)
        assert not token
        return events
    finally:
        await store.close()


def group_value(ev, key: str) -> str:
    if key == "outcome":
        return Outcome(ev.outcome).name
    if key == "decision":
        return Decision(ev.decision).name
    if key == "evidence":
        return Evidence(ev.evidence).name
    return getattr(ev, key)


def assert_tables_match(res, text: str, events: list) -> None:
    assert res.tables, "the workflow printed no spend table"
    for title, (group_by, rows) in res.tables.items():
        if title == "export":
            continue
        assert title in text
        [key] = group_by
        sums = defaultdict(lambda: [0, 0, 0, 0, 0])
        for ev in events:
            s = sums[group_value(ev, key)]
            s[0] += 1
            s[1] += ev.cost_nanos
            s[2] += ev.revenue_nanos
            s[3] += ev.input_tokens
            s[4] += ev.output_tokens
        printed = {r.group[key]: [r.event_count, r.cost_nanos, r.revenue_nanos,
                                  r.usage.input_tokens, r.usage.output_tokens]
                   for r in rows}
        assert printed == dict(sums), title
        # Amounts are exact, with the decimals of their column (totals included).
        cost_places = column_decimals([r.cost_nanos for r in rows]
                                      + [sum(r.cost_nanos for r in rows)])
        margin_places = column_decimals([r.margin_nanos for r in rows]
                                        + [sum(r.margin_nanos for r in rows)])
        for r in rows:
            assert usd(r.cost_nanos, cost_places) in text
            assert r.margin_nanos == r.revenue_nanos - r.cost_nanos
            assert usd(r.margin_nanos, margin_places) in text


async def test_support_attributes_every_conversation_with_margin(tmp_path):
    res, text, db = await run(tmp_path, "support")
    events = await ledger(db, res.tenant_id)
    assert_tables_match(res, text, events)
    conversations = sum(n for _c, n in SUPPORT_CUSTOMERS)
    summaries = sum((n + 1) // 2 for _c, n in SUPPORT_CUSTOMERS)
    assert len(events) == conversations + summaries
    assert {e.customer for e in events} == {c for c, _n in SUPPORT_CUSTOMERS}
    assert all(e.revenue_nanos > e.cost_nanos > 0 for e in events)
    _rows = res.tables["Margin by customer"][1]
    assert {r.group["customer"] for r in _rows} == {c for c, _n in SUPPORT_CUSTOMERS}


async def test_code_review_warns_then_denies(tmp_path):
    res, text, db = await run(tmp_path, "code-review")
    events = await ledger(db, res.tenant_id)
    assert_tables_match(res, text, events)
    alice = [c["decision"] for c in res.calls if c["owners"]["employee"] == "alice"]
    assert alice[0] == "ALLOW" and alice[-1] == "DENY"
    assert "WARN" in alice and alice.index("WARN") < alice.index("DENY")
    warn = next(c for c in res.calls if c["decision"] == "WARN")
    assert "budget.soft_limit" in warn["reasons"]
    deny = next(c for c in res.calls if c["decision"] == "DENY")
    assert "budget.exceeded" in deny["reasons"]
    bob = [c for c in res.calls if c["owners"]["employee"] == "bob"]
    assert [c["decision"] for c in bob] == ["ALLOW"]
    denied = [e for e in events if e.kind == "denied"]
    assert [e.employee for e in denied] == ["alice"]


async def test_extraction_retries_duplicates_and_clamp(tmp_path):
    res, text, db = await run(tmp_path, "extraction")
    events = await ledger(db, res.tenant_id)
    assert_tables_match(res, text, events)
    by_id = {e.event_id: e for e in events}
    retries = [e for e in events if e.retry_of]
    assert len(retries) == len(FAILING)
    for r in retries:
        first = by_id[r.retry_of]
        assert Outcome(first.outcome) == Outcome.PROVIDER_ERROR and first.cost_nanos == 0
        assert first.attempt == 1 and r.attempt == 2 and first.labels == r.labels
    assert all(e.attempt == 1 for e in events if not e.retry_of)
    clamped = [c for c in res.calls if "budget.clamped" in c["reasons"]]
    assert clamped and all(0 < c["cap"] < 1000 and c["decision"] == "ALLOW"
                           for c in clamped)
    assert not any(c["decision"] == "DENY" for c in res.calls)
    if res.notes:  # fingerprint_only not offered by this server
        pytest.skip(res.notes[0])
    doc = {e.event_id: e.labels["doc"] for e in events}
    dups = {(doc[e.event_id], doc[e.duplicate_of]) for e in events if e.duplicate_of}
    for copy, original in DUPLICATES.items():
        if copy < EXTRACTION_DOCS:
            assert (f"doc-{copy}", f"doc-{original}") in dups
    assert f"doc-{min(DUPLICATES)} is doc-{DUPLICATES[min(DUPLICATES)]} again" in text
    # A retry matches its own first attempt by design: said so, never "doc-2 = doc-2".
    assert not re.search(r"\b(doc-\d+) (=|is) \1\b", text), text
    assert "re-sent their own document (doc-2, doc-5)" in text
    assert "attempt 1, retry of" not in text and "doc-2: attempt 2, retry of" in text


async def test_finance_exports_and_verifies(tmp_path):
    res, text, db = await run(tmp_path, "finance")
    events = await ledger(db, res.tenant_id)
    assert_tables_match(res, text, events)
    assert len(events) == len(res.calls) == 5
    # Signed private_gateway reports: every event ATTESTED, and it shows.
    assert {Evidence(e.evidence) for e in events} == {Evidence.ATTESTED}
    assert {e.privacy_mode for e in events} == {int(PrivacyMode.PRIVATE_GATEWAY)}
    assert [c["evidence"] for c in res.calls] == ["ATTESTED"] * 5
    assert "Spend by evidence" in text and "attested" in text.lower()
    # The unsigned report was refused and left nothing (mallory is not in the ledger).
    assert "unsigned report refused: SIGNATURE_MISSING" in res.notes, res.notes
    assert "SIGNATURE_MISSING" in text
    assert "mallory" not in {e.employee for e in events}
    assert "verify exit 0" in res.notes, res.notes
    [path] = res.tables["export"][1]
    with open(path) as fh:
        exported = fh.read()
    assert all(e.event_id in exported for e in events)


def test_demo_output_is_clean_without_a_secret_key(tmp_path):
    """`p402 demo` as a user runs it: no P402_SECRET_KEY warning in its output (that
    warning belongs to `p402 serve`'s start; tests/server/test_secret_key_warning.py)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "P402_SECRET_KEY"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(
        [root, os.path.join(root, "server"), os.path.join(root, "clients", "python"),
         env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from p402_server.cli import main; "
                               "sys.exit(main(sys.argv[1:]))",
         "demo", "--workflow", "finance", "--listen", "127.0.0.1:0",
         "--db", f"sqlite+aiosqlite:///{tmp_path}/demo.db"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ATTESTED" in proc.stdout and "SIGNATURE_MISSING" in proc.stdout
    assert "P402_SECRET_KEY" not in proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr

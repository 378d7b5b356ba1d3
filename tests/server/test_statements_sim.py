"""A seeded random run of Records (in any month, late ones included) and statement
closes (any month, any customer, in any order, repeated): every event ends up on at
most one statement, on exactly one once a close of its customer came after it and its
month is closed, never on a statement of a month that was not closed, and every
statement still verifies against the ledger and matches what it said when closed."""
from __future__ import annotations

import datetime as dt
import json
import os
import random

import pytest
from p402.v1 import admin_pb2, common_pb2, meter_pb2

from p402_server.ledger import statements as st
from tests.server.service_harness import owners, svc  # noqa: F401

MONTHS = [f"2026-0{m}" for m in range(1, 7)]
CUSTOMERS = ["acme", "globex", "initech"]


def _ms(month: str, rng: random.Random) -> int:
    start, end = st.period_bounds(month)
    return rng.randrange(start, end)


@pytest.mark.parametrize("seed", [int(os.environ.get("P402_STMT_SEED", 0)) or s
                                  for s in (11, 29, 47)])
async def test_every_event_is_stated_once(svc, seed):
    rng = random.Random(seed)
    closed: dict[tuple[str, str], str] = {}   # (month, customer) -> document
    for _ in range(140):
        if rng.random() < 0.75:
            c, m = rng.choice(CUSTOMERS), rng.choice(MONTHS)
            await svc.meter.Record(meter_pb2.RecordRequest(
                model="gpt-4o-mini", owners=owners(customer=c, feature=rng.choice("ab")),
                event_time_ms=_ms(m, rng),
                usage=common_pb2.Usage(input_tokens=rng.randrange(1, 5000),
                                       output_tokens=rng.randrange(0, 500))),
                metadata=svc.auth)
        else:
            m, c = rng.choice(MONTHS), rng.choice(CUSTOMERS)
            resp = await svc.admin.CloseStatements(admin_pb2.CloseStatementsRequest(
                period=m, customer=c), metadata=svc.auth)
            for s in resp.statements:
                key = (m, c)
                assert closed.setdefault(key, s.document_json) == s.document_json  # immutable
    events = (await svc.store.query_events(svc.tenant_id, page_size=1000))[0]
    docs = {k: json.loads(v) for k, v in closed.items()}
    covered: dict[str, list] = {}
    for key, doc in docs.items():
        regular, late = st.select(doc, events)
        for e in regular + late:
            covered.setdefault(e.event_id, []).append(key)
        again = st.recompute(doc, events)
        assert st.differences(doc, again) == [], key
        v = await svc.admin.VerifyStatement(admin_pb2.Statement(
            document_json=closed[key]), metadata=svc.auth)
        assert v.ok, (key, v.reason)
    assert any(d["adjustments"] for d in docs.values()), "the run made no late event"
    last = {c: max((d["through_index"] for (m, cc), d in docs.items() if cc == c), default=0)
            for c in CUSTOMERS}
    for e in events:
        month = st.period_of(e.event_ms)
        where = covered.get(e.event_id, [])
        assert len(where) <= 1, (e.event_id, where)  # never on two statements
        if (month, e.customer) in docs and e.chain_index <= last[e.customer]:
            assert len(where) == 1, (e.event_id, month, e.customer)
        if (month, e.customer) not in docs:
            assert not where, (e.event_id, where)  # a month never closed states nothing

"""The idempotency memory (events by id, by reservation, Authorize answers) is bounded
by count and by estimated bytes: events of any size cannot grow a tenant's memory
past `recent_ids_mib`, and a retry beyond memory is answered from the ledger."""
from __future__ import annotations

import random
import sys

import pytest

from p402_server.ledger.model import LedgerEvent
from p402_server.runtime.config import ServerConfig
from p402_server.runtime.shared import _LRU, event_bytes
from p402core import InvalidArgument
from tests.server.service_harness import common_pb2, meter_pb2, owners, start_service

MODEL = "gpt-4o-mini"


def test_the_lru_keeps_its_weight_and_bounds_through_any_sequence():
    rng = random.Random(402)
    for _case in range(200):
        limit, cap = rng.randint(1, 12), rng.randint(0, 400)
        lru = _LRU(limit, max_bytes=cap, weigh=len)
        for _op in range(60):
            key = rng.randint(0, 15)
            if rng.random() < 0.7:
                lru.put(key, "x" * rng.randint(0, 120))
            elif rng.random() < 0.5:
                lru.pop(key, None)
            else:
                with pytest.raises(KeyError) if key not in lru else _nothing():
                    lru.pop(key)
            assert lru.bytes == sum(len(v) for v in lru.values())
            assert len(lru) <= limit
            # Over the cap only when one entry alone weighs more (the newest stays).
            assert lru.bytes <= cap or len(lru) == 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_oldest_go_first_and_a_caller_given_weight_is_used():
    lru = _LRU(100, max_bytes=10, weigh=len)
    lru.put("a", "aaaa")
    lru.put("b", "bbbb")
    lru.put("c", "cc", weight=4)  # weighed by the caller, not by len
    assert list(lru) == ["b", "c"] and lru.bytes == 8
    lru.put("b", "b")  # replaced in place: its new weight counts
    assert list(lru) == ["b", "c"] and lru.bytes == 5


def test_an_event_weighs_at_least_what_its_strings_hold():
    heavy = LedgerEvent(tenant_id="t", event_id="e", customer="🙂" * 256,
                        labels={f"k{i}" + "é" * 250: "v" * 256 for i in range(16)})
    strings = sys.getsizeof(heavy.customer) + sum(
        sys.getsizeof(k) + sys.getsizeof(v) for k, v in heavy.labels.items())
    assert event_bytes(heavy) >= strings
    assert event_bytes(LedgerEvent(tenant_id="t", event_id="e")) < 2000


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -1])
def test_the_setting_must_be_a_positive_finite_number(value):
    with pytest.raises(InvalidArgument) as err:
        ServerConfig(recent_ids_mib=value)
    assert err.value.field == "recent_ids_mib"
    with pytest.raises(InvalidArgument) as err:
        ServerConfig.from_env({"P402_RECENT_IDS_MIB": str(value)})
    assert err.value.field == "recent_ids_mib"


async def test_large_events_stay_within_the_cap_and_retries_beyond_it_are_duplicates(
        tmp_path):
    svc = await start_service(f"sqlite+aiosqlite:///{tmp_path}/l.db", recent_ids_mib=0.25)
    try:
        labels = {f"k{i:02d}" + "x" * 250: "v" * 256 for i in range(16)}

        def record(i: int):
            return meter_pb2.RecordRequest(
                event_id=f"evt_{i:04d}", model=MODEL, labels=labels,
                owners=owners(customer=f"c{i:03d}" + "c" * 250),
                usage=common_pb2.Usage(input_tokens=10, output_tokens=5))

        for i in range(120):
            r = await svc.meter.Record(record(i), metadata=svc.auth)
            assert not r.duplicate
        rt = svc.server.runtime.tenants[svc.tenant_id]
        cap = int(0.25 * 1024 * 1024)
        assert 0 < rt._events.bytes <= cap
        assert 0 < len(rt._events) < 120  # some were forgotten, by weight not count
        assert "evt_0000" not in rt._events
        # Forgotten, but not lost: the retry is a duplicate and nothing is counted twice.
        again = await svc.meter.Record(record(0), metadata=svc.auth)
        assert again.duplicate and again.event_id == "evt_0000"
        await svc.server.writer.flush()
        resp = await svc.meter.Query(meter_pb2.QueryRequest(group_by=["outcome"]),
                                     metadata=svc.auth)
        assert sum(row.event_count for row in resp.rows) == 120
    finally:
        await svc.close()

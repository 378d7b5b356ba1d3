"""The price book, on SQLite and PostgreSQL: a Record without revenue is sold at the
book's prices (cost-plus, per-model sell prices with units, per-customer overrides, a
minimum per call), an explicit revenue wins, bad books are refused naming the field,
and the book survives a restart."""
from __future__ import annotations

import json

import grpc
import pytest
from p402.v1 import admin_pb2, common_pb2, meter_pb2

import p402core
from tests.server.service_harness import nanos, owners, svc_any, usd  # noqa: F401

CATALOG = p402core.Catalog.default()
BOOK = {
    "markup_pct": "20",
    "min_per_call_usd": "0.0001",
    "models": {"gpt-4o": {"markup_pct": "50"},
               "low/1024-x-1024/gpt-image-1": {"sell": {"input_pico": 0, "output_pico": 0,
                                                         "units": {"images": 10**11}}}},
    "customers": {"acme": {"markup_pct": "10",
                           "models": {"gpt-4o": {"markup_pct": "0"}}}},
}


async def _put(svc, doc) -> admin_pb2.PriceBook:
    return await svc.admin.PutPriceBook(admin_pb2.PriceBook(document_json=json.dumps(doc)),
                                        metadata=svc.auth)


async def _sold(svc, customer: str, model: str, revenue=None, **usage) -> tuple[int, int]:
    r = await svc.meter.Record(meter_pb2.RecordRequest(
        model=model, owners=owners(customer=customer), usage=common_pb2.Usage(**usage),
        revenue=usd(revenue) if revenue is not None else None), metadata=svc.auth)
    ev = await svc.store.get_event(svc.tenant_id, r.event_id)
    return ev.cost_nanos, ev.revenue_nanos


def _plus(cost: int, pct: int) -> int:
    return (cost * (100 + pct) * 2 + 100) // 200  # half-up


async def test_revenue_from_the_book(svc_any):
    svc = svc_any
    assert (await _sold(svc, "globex", "gpt-4o-mini", input_tokens=1000))[1] == 0  # no book
    book = await _put(svc, BOOK)
    assert book.version.startswith("pb-")
    assert (await svc.admin.GetPriceBook(admin_pb2.GetPriceBookRequest(),
                                         metadata=svc.auth)).version == book.version
    cost, rev = await _sold(svc, "globex", "gpt-4o-mini", input_tokens=100_000,
                            output_tokens=1000)
    assert rev == _plus(cost, 20)
    cost, rev = await _sold(svc, "globex", "gpt-4o", input_tokens=100_000, output_tokens=1000)
    assert rev == _plus(cost, 50)
    cost, rev = await _sold(svc, "acme", "gpt-4o-mini", input_tokens=100_000,
                            output_tokens=1000)
    assert rev == _plus(cost, 10)  # the customer's markup
    cost, rev = await _sold(svc, "acme", "gpt-4o", input_tokens=100_000, output_tokens=1000)
    assert rev == cost  # the customer's rule for the model: at cost
    # a sell price per unit: 2 images at 0.1 USD, whatever they cost
    cost, rev = await _sold(svc, "globex", "low/1024-x-1024/gpt-image-1", images=2)
    assert rev == 200_000_000 and cost == CATALOG.cost_nanos(
        "low/1024-x-1024/gpt-image-1", images=2)
    # the minimum per call lifts a tiny call; an explicit revenue always wins
    cost, rev = await _sold(svc, "globex", "gpt-4o-mini", input_tokens=1)
    assert rev == 100_000 > _plus(cost, 20)
    assert (await _sold(svc, "globex", "gpt-4o", revenue=7, input_tokens=1000))[1] == 7
    # it survives a restart; "{}" removes it
    await svc.restart()
    cost, rev = await _sold(svc, "globex", "gpt-4o", input_tokens=10_000)
    assert rev == _plus(cost, 50)
    assert (await _put(svc, {})).document_json == "{}"
    assert (await _sold(svc, "globex", "gpt-4o", input_tokens=10_000))[1] == 0


@pytest.mark.parametrize("doc,field", [
    ({"markup_pct": "lots"}, "markup_pct"),
    ({"markup_pct": "-101"}, "markup_pct"),
    ({"min_per_call_usd": "-1"}, "min_per_call_usd"),
    ({"min_per_call_usd": "0.0000000001"}, "min_per_call_usd"),
    ({"bogus": 1}, "bogus"),
    ({"models": {"m": {"markup_pct": "5", "sell": {"input_pico": 1, "output_pico": 1}}}},
     "models.m"),
    ({"models": {"m": {"sell": {"input_pico": -1, "output_pico": 1}}}}, "models.m.sell.input_pico"),
    ({"customers": {"acme": {"models": {"m": {"nope": 1}}}}}, "customers.acme.models.m.nope"),
    ({"customers": {"acme": []}}, "customers.acme"),
])
async def test_bad_books_are_refused_naming_the_field(svc_any, doc, field):
    svc = svc_any
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _put(svc, doc)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    # nothing changed
    assert (await svc.admin.GetPriceBook(admin_pb2.GetPriceBookRequest(),
                                         metadata=svc.auth)).document_json == "{}"


@pytest.mark.parametrize("doc,field", [
    ({"models": {"gpt\x00-4o": {"markup_pct": "5"}}}, "models"),
    ({"customers": {"acme\x00": {"markup_pct": "5"}}}, "customers"),
    ({"customers": {"acme": {"models": {"m" * 257: {"markup_pct": "5"}}}}},
     "customers.acme.models"),
    ({"models": {"\ud800": {"markup_pct": "5"}}}, "models"),
])
async def test_model_and_customer_names_follow_the_string_contract(svc_any, doc, field):
    """A name no event could carry (NUL, a lone surrogate, over 256 characters) is
    refused naming where it is, on PostgreSQL too (whose JSON cannot hold NUL)."""
    svc = svc_any
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.admin.PutPriceBook(admin_pb2.PriceBook(
            document_json=json.dumps(doc)), metadata=svc.auth)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":")
    assert (await svc.admin.GetPriceBook(admin_pb2.GetPriceBookRequest(),
                                         metadata=svc.auth)).document_json == "{}"

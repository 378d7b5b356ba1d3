"""Receipts: what asking for one costs. Unary Record at 32 in flight with and without
`want_receipt` (same server, same run, interleaved rounds), and the server's signing
cost per receipt (receipts.Signer.sign on a committed event, in-process).

Target: Record with a receipt ≥ 0.8× the calls/s of Record without.

Run: `python benchmarks/bench_receipts.py [--quick]` (server in a subprocess on
127.0.0.1, temporary SQLite ledger; meter-only Records with distinct event ids).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import grpc

import rpc_harness as h  # noqa: E402  (sets sys.path)
from p402.v1 import common_pb2, meter_pb2, meter_pb2_grpc

_ids = itertools.count()


def record(want: bool) -> meter_pb2.RecordRequest:
    i = next(_ids)
    return meter_pb2.RecordRequest(
        event_id=f"bench-r-{i}", model="gpt-4o-mini",
        owners=common_pb2.Owners(customer=f"cust-{i % 50}", feature="chat"),
        usage=common_pb2.Usage(input_tokens=1000 + i % 500, output_tokens=200),
        want_receipt=want)


def signing_us(n: int) -> float:
    """Microseconds per receipt: sign a committed-looking event n times."""
    from p402_server.privacy.signing import new_evidence_key
    from p402_server.ledger.receipts import Signer
    from p402_server.ledger.model import LedgerEvent

    signer = Signer(new_evidence_key())
    ev = LedgerEvent(tenant_id="t_bench", event_id="evt_01J000000000000000000000",
                     event_ms=1_764_000_000_000, customer="acme", feature="chat",
                     model="gpt-4o-mini", provider="openai", input_tokens=1200,
                     output_tokens=300, cost_nanos=360_000, evidence=2, chain_index=42,
                     chain_hash="ab" * 32, catalog_version="p402-default")
    signer.sign(ev)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            signer.sign(ev)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


async def main(quick: bool) -> None:
    n = 2000 if quick else 9000
    with h.server_process() as info:
        md = (("authorization", f"Bearer {info['api_key']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}") as ch:
            meter = meter_pb2_grpc.MeterServiceStub(ch)
            impl = (await meter.Ping(meter_pb2.PingRequest(), metadata=md)).implementation
            h.banner("Record with and without a signed receipt", impl)

            async def plain():
                await meter.Record(record(False), metadata=md)

            async def signed():
                r = await meter.Record(record(True), metadata=md)
                assert r.receipt

            await h.in_flight(plain, 300)
            await h.in_flight(signed, 300)
            rps = {"plain": [], "receipt": []}
            for _ in range(3):
                rps["plain"].append((await h.in_flight(plain, n // 3))[0])
                rps["receipt"].append((await h.in_flight(signed, n // 3))[0])
    plain_rps, receipt_rps = h.median(rps["plain"]), h.median(rps["receipt"])
    print(f"Record, no receipt        {plain_rps:>10,.0f} calls/s (32 in flight)")
    print(f"Record, want_receipt      {receipt_rps:>10,.0f} calls/s "
          f"({receipt_rps / plain_rps:.2f}x; target >= 0.8x)")
    print(f"signing one receipt       {signing_us(2000 if quick else 10000):>10.1f} µs "
          "(server side, in-process)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    asyncio.run(main(ap.parse_args().quick))

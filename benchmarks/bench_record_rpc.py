"""Durable Record over gRPC: unary at 32 in flight vs Ping, and batched/streamed
events per second into SQLite — all acknowledged only after the commit.

Targets: unary Record p50 ≤ 1.3× Ping p50 (one caller) and RPS ≥ 0.85× Ping RPS
(32 in flight; same server, same run); RecordBatch and StreamRecordBatches ≥ 25,000
events/s into SQLite (WAL, synchronous=FULL). StreamRecords carries one Record per
message, each answered: like a unary call, each message costs a gRPC read and write,
so its target is the unary one, ≥ 0.85× Ping's calls/s (what many events per message
buy is StreamRecordBatches'). On a shared machine the absolute numbers move with the
load; the last line relates each to the Ping rate of the same run.

Run: `python benchmarks/bench_record_rpc.py [--quick]` (server in a subprocess on
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


def record(rng_i: int) -> meter_pb2.RecordRequest:
    return meter_pb2.RecordRequest(
        event_id=f"bench-{next(_ids)}", model="gpt-4o-mini",
        owners=common_pb2.Owners(customer=f"cust-{rng_i % 50}", feature="chat"),
        usage=common_pb2.Usage(input_tokens=1000 + rng_i % 500, output_tokens=200),
        labels={"env": "prod"})


async def main(quick: bool) -> None:
    n_unary = 3000 if quick else 15000
    n_events = 20000 if quick else 100000
    batch = 500
    with h.server_process() as info:
        md = (("authorization", f"Bearer {info['api_key']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}") as ch:
            meter = meter_pb2_grpc.MeterServiceStub(ch)
            ping_req = meter_pb2.PingRequest()
            impl = (await meter.Ping(ping_req, metadata=md)).implementation
            h.banner("Durable Record over gRPC into SQLite", impl)

            async def ping():
                await meter.Ping(ping_req, metadata=md)

            async def unary():
                await meter.Record(record(next(_ids)), metadata=md)

            await h.in_flight(ping, 500)
            await h.in_flight(unary, 500)
            rps = {"ping": [], "record": []}
            p50 = {"ping": [], "record": []}
            for _ in range(3):
                p50["ping"].append(h.median(await h.sequential(ping, n_unary // 10)))
                p50["record"].append(h.median(await h.sequential(unary, n_unary // 10)))
                rps["ping"].append((await h.in_flight(ping, n_unary // 3))[0])
                rps["record"].append((await h.in_flight(unary, n_unary // 3))[0])
            ping_rps, rec_rps = h.median(rps["ping"]), h.median(rps["record"])
            ping_p50, rec_p50 = h.median(p50["ping"]), h.median(p50["record"])

            # RecordBatch: 4 batches in flight so commits overlap with encoding.
            batches = [meter_pb2.RecordBatchRequest(records=[record(i) for i in range(batch)])
                       for _ in range(n_events // batch)]
            t0 = time.perf_counter()
            sem = asyncio.Semaphore(4)

            async def send(b):
                async with sem:
                    resp = await meter.RecordBatch(b, metadata=md)
                    assert not any(r.duplicate for r in resp.results)

            await asyncio.gather(*[send(b) for b in batches])
            batch_eps = n_events / (time.perf_counter() - t0)

            reqs = [record(i) for i in range(n_events)]

            async def gen():
                for r in reqs:
                    yield r

            t0 = time.perf_counter()
            got = 0
            async for _ in meter.StreamRecords(gen(), metadata=md):
                got += 1
            stream_eps = got / (time.perf_counter() - t0)
            assert got == n_events

            # StreamRecordBatches: one stream of batches, a message per batch.
            sbatches = [meter_pb2.RecordBatchRequest(records=[record(i) for i in range(batch)])
                        for _ in range(n_events // batch)]

            async def bgen():
                for b in sbatches:
                    yield b

            t0 = time.perf_counter()
            got = 0
            async for resp in meter.StreamRecordBatches(bgen(), metadata=md):
                got += len(resp.results)
            sbatch_eps = got / (time.perf_counter() - t0)
            assert got == n_events

    print(f"unary, one caller ({n_unary // 10} calls each, median of 3 rounds):")
    print(f"  ping    p50 {ping_p50 * 1e3:6.3f} ms")
    print(f"  record  p50 {rec_p50 * 1e3:6.3f} ms   ratio {rec_p50 / ping_p50:.2f}x "
          f"(target <= 1.3)  {'OK' if rec_p50 / ping_p50 <= 1.3 else 'MISS'}")
    print(f"unary, 32 in flight ({n_unary} calls each, median of 3 rounds):")
    print(f"  ping    {ping_rps:8.0f} calls/s")
    print(f"  record  {rec_rps:8.0f} calls/s   ratio {rec_rps / ping_rps:.3f}x "
          f"(target >= 0.85)  {'OK' if rec_rps / ping_rps >= 0.85 else 'MISS'}")
    print(f"RecordBatch ({batch} per call, 4 in flight): {batch_eps:9.0f} events/s "
          f"(target >= 25,000)  {'OK' if batch_eps >= 25000 else 'MISS'}")
    print(f"StreamRecords (one stream):             {stream_eps:9.0f} events/s "
          f"ratio {stream_eps / ping_rps:.2f}x Ping's calls/s (target >= 0.85)  "
          f"{'OK' if stream_eps / ping_rps >= 0.85 else 'MISS'}")
    print(f"StreamRecordBatches ({batch} per message):  {sbatch_eps:9.0f} events/s "
          f"(target >= 25,000)  {'OK' if sbatch_eps >= 25000 else 'MISS'}")
    print(f"events/s per Ping call/s (same run): RecordBatch {batch_eps / ping_rps:.1f}, "
          f"StreamRecordBatches {sbatch_eps / ping_rps:.1f}, StreamRecords "
          f"{stream_eps / ping_rps:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    asyncio.run(main(ap.parse_args().quick))

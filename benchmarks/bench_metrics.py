"""What operators' metrics cost: Authorize calls/s at 32 in flight on a server with
metrics (decision counters and latency histograms on every call, metrics.py) and on
one without (`p402 serve --no-metrics`), same run, interleaved rounds.

Target: with metrics ≥ 0.95x the calls/s without. The metrics' own cost per
Authorize is printed too (in-process, one decision counted and one latency observed).

Run: `python benchmarks/bench_metrics.py [--quick]` (two server subprocesses on
127.0.0.1, temporary SQLite ledgers).
"""
from __future__ import annotations

import argparse
import asyncio

import grpc

import rpc_harness as h  # noqa: E402  (sets sys.path)
from p402.v1 import common_pb2, meter_pb2, meter_pb2_grpc


async def main(quick: bool) -> None:
    n = 3000 if quick else 15000
    with h.server_process(metrics=True) as on, h.server_process(metrics=False) as off:
        calls, impl = {}, ""
        channels = []
        for name, info in (("on", on), ("off", off)):
            md = (("authorization", f"Bearer {info['api_key']}"),)
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}")
            channels.append(ch)
            meter = meter_pb2_grpc.MeterServiceStub(ch)
            impl = (await meter.Ping(meter_pb2.PingRequest(), metadata=md)).implementation
            req = meter_pb2.AuthorizeRequest(model="gpt-4o-mini", input_bytes=4000,
                                             owners=common_pb2.Owners(customer="acme"),
                                             max_output_tokens=200)

            async def call(meter=meter, md=md, req=req):
                await meter.Authorize(req, metadata=md)

            calls[name] = call
        h.banner("Authorize with and without metrics", impl)
        for c in calls.values():
            await h.in_flight(c, 500)
        rps = {"on": [], "off": []}
        for i in range(6):  # the order alternates: neither side always goes first
            for name in (("off", "on") if i % 2 else ("on", "off")):
                rps[name].append((await h.in_flight(calls[name], n // 6))[0])
        for ch in channels:
            await ch.close()
    on_rps, off_rps = h.median(rps["on"]), h.median(rps["off"])
    print(f"Authorize, no metrics     {off_rps:>10,.0f} calls/s (32 in flight)")
    print(f"Authorize, metrics on     {on_rps:>10,.0f} calls/s "
          f"({on_rps / off_rps:.2f}x; target >= 0.95x)")
    print(f"metrics per Authorize     {per_call_us():>10.2f} µs (in-process)")


def per_call_us(n: int = 100_000) -> float:
    import time
    from types import SimpleNamespace

    from p402_server.observe.metrics import Metrics

    m, resp = Metrics(), SimpleNamespace(decision=1, reasons=())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            m.authorized(resp, time.perf_counter())
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    asyncio.run(main(ap.parse_args().quick))

"""Authorize and Record over gRPC with leases on vs leases off, same run.

Question: what does scale-out cost a single process? With `--lease on` every
Authorize also checks the lease deadline, every Record reports its cost to the lease
and answers the store-level budget status, and a background task tops slices up.
Target: calls/s with leases on >= 0.9x leases off, for Authorize and for
Authorize + Record, 32 in flight.

Run: `python benchmarks/bench_leases_rpc.py [--quick]`. Two server subprocesses on
127.0.0.1 (each with its own SQLite ledger, one with leases on), the same tenant
set-up (HARD budgets far from their limits, as bench_authorize_rpc.py), windows
alternating between them so the machine's drift hits both alike; the figure is the
median of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random

import grpc

import rpc_harness as h  # noqa: E402  (sets sys.path)
from bench_authorize_rpc import MODELS, setup
from p402.v1 import admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc


def _requests() -> list:
    rng = random.Random(402)
    return [meter_pb2.AuthorizeRequest(
        model=rng.choice(MODELS), input_bytes=rng.randint(200, 20000),
        max_output_tokens=rng.choice([256, 1024, 4096]),
        owners=common_pb2.Owners(customer=rng.choice(["acme", "globex", "initech"]),
                                 feature=rng.choice(["chat", "search"]), department="eng"),
        labels={"env": rng.choice(["prod", "dev"])}) for _ in range(1000)]


class Side:
    def __init__(self, info, ch):
        self.md = (("authorization", f"Bearer {info['api_key']}"),)
        self.meter = meter_pb2_grpc.MeterServiceStub(ch)
        self.admin = admin_pb2_grpc.AdminServiceStub(ch)
        self.reqs = _requests()
        self.i = 0

    async def authorize(self):
        self.i += 1
        r = await self.meter.Authorize(self.reqs[self.i % 1000], metadata=self.md)
        if r.decision == common_pb2.DECISION_DENY:
            raise AssertionError(f"denied: {list(r.reasons)}")
        return r

    async def authorize_record(self):
        a = await self.authorize()
        await self.meter.Record(meter_pb2.RecordRequest(
            reservation_id=a.reservation_id,
            usage=common_pb2.Usage(input_tokens=a.estimated_input_tokens // 2,
                                   output_tokens=a.output_token_cap // 4)),
            metadata=self.md)


async def main(quick: bool) -> None:
    n = 2000 if quick else 8000
    pairs = 3 if quick else 7
    with h.server_process() as off_info, h.server_process(leases=True) as on_info:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{off_info['port']}") as c_off, \
                grpc.aio.insecure_channel(f"127.0.0.1:{on_info['port']}") as c_on:
            sides = {"off": Side(off_info, c_off), "on": Side(on_info, c_on)}
            for side in sides.values():
                await setup(side.admin, side.md)
            impl = (await sides["off"].meter.Ping(meter_pb2.PingRequest(),
                                                  metadata=sides["off"].md)).implementation
            h.banner("Authorize (+ Record) over gRPC, leases on vs off", impl)
            for side in sides.values():  # warm-up: engines built, first slices leased
                for _ in range(50):
                    try:
                        await side.authorize()
                        break
                    except AssertionError:
                        await asyncio.sleep(0.1)
                await h.in_flight(side.authorize, 500)
                await h.in_flight(side.authorize_record, 300)
            ratios = {"authorize": [], "authorize_record": []}
            rates = {k: {"off": [], "on": []} for k in ratios}
            for p in range(pairs):
                for what in ratios:
                    order = ("off", "on") if p % 2 == 0 else ("on", "off")
                    got = {}
                    for name in order:
                        fn = getattr(sides[name], what)
                        count = n if what == "authorize" else n // 2
                        got[name], _lat = await h.in_flight(fn, count, 32)
                        rates[what][name].append(got[name])
                    ratios[what].append(got["on"] / got["off"])
    figures = []
    for what, rs in ratios.items():
        r = h.median(rs)
        print(f"{what:17s} off {h.median(rates[what]['off']):8.0f} calls/s   on "
              f"{h.median(rates[what]['on']):8.0f} calls/s   on/off {r:.3f}x "
              f"(pairs {', '.join(f'{x:.2f}' for x in rs)})  target >= 0.90 "
              f"{'OK' if r >= 0.9 else 'MISS'}")
        figures.append({"name": f"{what} calls/s, leases on / off (32 in flight)",
                        "value": r, "target": ">= 0.90", "met": r >= 0.9,
                        "measured": h.median(rates[what]["on"]),
                        "baseline": h.median(rates[what]["off"])})
    print("BENCH_JSON " + json.dumps({"bench": "leases_rpc", "figures": figures}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    asyncio.run(main(ap.parse_args().quick))

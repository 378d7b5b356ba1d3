"""Authorize over gRPC vs Ping (authenticated no-op) on the same server, same run.

Question: what does the decision itself add to a gateway's round trip? Targets:
p50 ≤ 1.10× Ping, p99 ≤ 1.25× Ping, RPS at 32 in flight ≥ 0.9× Ping.

Run: `python benchmarks/bench_authorize_rpc.py [--quick]`. The server is a
subprocess on 127.0.0.1 (separate GIL); the tenant has 6 budgets and 4 policy rules
matching the requests, so the decision path is realistic. Sequential and
concurrent rounds alternate Ping and Authorize blocks so drift hits both alike.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random

import grpc

import rpc_harness as h  # noqa: E402  (sets sys.path)
from p402.v1 import admin_pb2, admin_pb2_grpc, common_pb2, meter_pb2, meter_pb2_grpc
from google.type import money_pb2

MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash"]


async def setup(admin, md) -> None:
    usd = lambda n: money_pb2.Money(currency_code="USD", units=n)  # noqa: E731
    budgets = [
        admin_pb2.Budget(budget_id="tenant", limit=usd(10**6)),
        admin_pb2.Budget(budget_id="acme", limit=usd(10**5), scope={"customer": "acme"}),
        admin_pb2.Budget(budget_id="chat-day", limit=usd(10**4), scope={"feature": "chat"},
                         period=common_pb2.PERIOD_DAY),
        admin_pb2.Budget(budget_id="eng", limit=usd(10**5), scope={"department": "eng"},
                         enforcement=common_pb2.ENFORCEMENT_SOFT),
        admin_pb2.Budget(budget_id="prod", limit=usd(10**5), scope={"label.env": "prod"}),
        admin_pb2.Budget(budget_id="total", limit=usd(10**7), period=common_pb2.PERIOD_TOTAL),
    ]
    for b in budgets:
        await admin.PutBudget(admin_pb2.PutBudgetRequest(budget=b), metadata=md)
    rules = [
        admin_pb2.PolicyRule(rule_id="owners", effect=admin_pb2.EFFECT_REQUIRE_OWNERS,
                             require_owners=["customer"]),
        admin_pb2.PolicyRule(rule_id="models", effect=admin_pb2.EFFECT_ALLOW_MODELS,
                             allow_models=["*gpt-*", "*claude-*", "*gemini-*"]),
        admin_pb2.PolicyRule(rule_id="cap", effect=admin_pb2.EFFECT_MAX_OUTPUT_TOKENS,
                             max_output_tokens=2048),
        admin_pb2.PolicyRule(rule_id="warn-opus", effect=admin_pb2.EFFECT_WARN,
                             models=["claude-opus*"]),
    ]
    for r in rules:
        await admin.PutPolicyRule(admin_pb2.PutPolicyRuleRequest(rule=r), metadata=md)


async def main(quick: bool) -> None:
    n_seq = 600 if quick else 3000
    n_par = 3000 if quick else 20000
    rounds = 2 if quick else 3
    with h.server_process() as info:
        md = (("authorization", f"Bearer {info['api_key']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}") as ch:
            meter = meter_pb2_grpc.MeterServiceStub(ch)
            await setup(admin_pb2_grpc.AdminServiceStub(ch), md)
            rng = random.Random(402)
            reqs = [meter_pb2.AuthorizeRequest(
                model=rng.choice(MODELS), input_bytes=rng.randint(200, 20000),
                max_output_tokens=rng.choice([256, 1024, 4096]),
                owners=common_pb2.Owners(customer=rng.choice(["acme", "globex", "initech"]),
                                         feature=rng.choice(["chat", "search"]),
                                         department="eng"),
                labels={"env": rng.choice(["prod", "dev"])}) for _ in range(1000)]
            ping_req = meter_pb2.PingRequest()
            i = 0

            async def authorize():
                nonlocal i
                i += 1
                r = await meter.Authorize(reqs[i % 1000], metadata=md)
                assert r.decision != common_pb2.DECISION_DENY, r.reasons

            async def ping():
                await meter.Ping(ping_req, metadata=md)

            impl = (await meter.Ping(ping_req, metadata=md)).implementation
            h.banner("Authorize vs Ping over gRPC (client and server in separate processes)",
                     impl)
            # Warm-up (connection, caches, tenant engine).
            await h.in_flight(ping, 500)
            await h.in_flight(authorize, 500)

            seq = {"ping": [], "authorize": []}
            par = {"ping": [], "authorize": []}
            for _ in range(rounds):
                for name, fn in (("ping", ping), ("authorize", authorize)):
                    seq[name] += await h.sequential(fn, n_seq // rounds)
                for name, fn in (("ping", ping), ("authorize", authorize)):
                    rps, _lat = await h.in_flight(fn, n_par // rounds, 32)
                    par[name].append(rps)

    p50 = {k: h.pct(v, 0.50) for k, v in seq.items()}
    p99 = {k: h.pct(v, 0.99) for k, v in seq.items()}
    rps = {k: h.median(v) for k, v in par.items()}
    print(f"sequential ({n_seq} calls each):")
    for k in ("ping", "authorize"):
        print(f"  {k:10s} p50 {h.us(p50[k])}  p99 {h.us(p99[k])}")
    print(f"32 in flight ({n_par} calls each, median of {rounds} rounds):")
    for k in ("ping", "authorize"):
        print(f"  {k:10s} {rps[k]:8.0f} calls/s")
    r50 = p50["authorize"] / p50["ping"]
    r99 = p99["authorize"] / p99["ping"]
    rr = rps["authorize"] / rps["ping"]
    print("ratios (Authorize / Ping):")
    print(f"  p50 {r50:.3f}x  (target <= 1.10)  {'OK' if r50 <= 1.10 else 'MISS'}")
    print(f"  p99 {r99:.3f}x  (target <= 1.25)  {'OK' if r99 <= 1.25 else 'MISS'}")
    print(f"  RPS {rr:.3f}x  (target >= 0.90)  {'OK' if rr >= 0.9 else 'MISS'}")
    # One machine-readable line for `p402 bench` (benchmarks/report.py): the figures,
    # their baselines, and the sequential latencies (µs) for the histogram.
    print("BENCH_JSON " + json.dumps({
        "bench": "authorize_rpc",
        "figures": [
            {"name": "Authorize p50 / Ping p50", "value": r50, "target": "<= 1.10",
             "met": r50 <= 1.10, "measured_us": p50["authorize"] * 1e6,
             "baseline_us": p50["ping"] * 1e6},
            {"name": "Authorize p99 / Ping p99", "value": r99, "target": "<= 1.25",
             "met": r99 <= 1.25, "measured_us": p99["authorize"] * 1e6,
             "baseline_us": p99["ping"] * 1e6},
            {"name": "Authorize RPS / Ping RPS (32 in flight)", "value": rr,
             "target": ">= 0.90", "met": rr >= 0.9, "measured": rps["authorize"],
             "baseline": rps["ping"]},
        ],
        "latencies_us": {k: [round(x * 1e6, 1) for x in v] for k, v in seq.items()},
    }))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    asyncio.run(main(ap.parse_args().quick))

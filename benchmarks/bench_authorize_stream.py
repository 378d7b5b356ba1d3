"""Authorize as unary calls vs as messages on one StreamAuthorize stream, same run.

Question: what does a gateway that makes many decisions (the proxy's `--target`
mode) gain from `p402_client.AuthorizePipeline`? Both sides use the Python client
(`AsyncP402Client.authorize` vs `AuthorizePipeline.authorize`) against one server
subprocess with the tenant of bench_authorize_rpc.py (6 budgets, 4 rules), 32
callers in flight; blocks alternate so drift hits both alike. Figures: calls/s and
client+server CPU per call, each side's median; the ratio is stream / unary.
Target: stream calls/s >= 1.2x unary.

Run: `python benchmarks/bench_authorize_stream.py [--quick]`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource

import grpc

import rpc_harness as h  # noqa: E402  (sets sys.path)
from bench_authorize_rpc import MODELS, setup
from bench_gateways import _pid_listening, cpu_seconds
from p402.v1 import admin_pb2_grpc
from p402_client import AsyncP402Client, AuthorizePipeline


def _kwargs() -> list[dict]:
    rng = random.Random(402)
    return [dict(model=rng.choice(MODELS), input_bytes=rng.randint(200, 20000),
                 max_output_tokens=rng.choice([256, 1024, 4096]),
                 owners={"customer": rng.choice(["acme", "globex", "initech"]),
                         "feature": rng.choice(["chat", "search"]), "department": "eng"},
                 labels={"env": rng.choice(["prod", "dev"])}) for _ in range(1000)]


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(quick: bool) -> None:
    n = 3000 if quick else 20000
    rounds = 3 if quick else 5
    kws = _kwargs()
    with h.server_process() as info:
        md = (("authorization", f"Bearer {info['api_key']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}") as ch:
            await setup(admin_pb2_grpc.AdminServiceStub(ch), md)
        server_pid = _pid_listening(info["port"])
        client = AsyncP402Client(f"127.0.0.1:{info['port']}", api_key=info["api_key"])
        pipe = AuthorizePipeline(client)
        h.banner("Authorize: unary calls vs one StreamAuthorize stream",
                 (await client.ping()).implementation)
        i = 0

        def nxt() -> dict:
            nonlocal i
            i += 1
            return kws[i % len(kws)]

        async def unary():
            kw = nxt()
            await client.authorize(kw["model"], **{k: v for k, v in kw.items()
                                                   if k != "model"})

        async def stream():
            kw = nxt()
            await pipe.authorize(kw["model"], **{k: v for k, v in kw.items()
                                                 if k != "model"})

        sides = {"unary": unary, "stream": stream}
        rps: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        for call in sides.values():
            await h.in_flight(call, 500)
        for _ in range(rounds):
            for name, call in sides.items():
                c0 = own_cpu() + cpu_seconds([server_pid] if server_pid else [])
                rate, _lat = await h.in_flight(call, n // rounds)
                c1 = own_cpu() + cpu_seconds([server_pid] if server_pid else [])
                rps[name].append(rate)
                cpu[name].append((c1 - c0) / (n // rounds))
        await pipe.aclose()
        await client.close()
    u, s = h.median(rps["unary"]), h.median(rps["stream"])
    cu, cs = h.median(cpu["unary"]), h.median(cpu["stream"])
    print(f"32 in flight, {rounds} rounds of {n // rounds} calls per side:")
    print(f"  unary   {u:8.0f} calls/s   CPU {cu * 1e6:6.0f} µs/call (client + server)")
    print(f"  stream  {s:8.0f} calls/s   CPU {cs * 1e6:6.0f} µs/call (client + server)")
    print(f"ratio stream / unary: calls/s {s / u:.2f}x (target >= 1.2), "
          f"CPU/call {cs / cu:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    asyncio.run(main(ap.parse_args().quick))

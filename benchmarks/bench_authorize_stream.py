"""Authorize as unary calls vs on one stream, a message per request or per batch.

Question: what does a gateway that makes many decisions (the proxy's `--target`
mode) gain from `p402_client.AuthorizePipeline`? Three sides against one server
subprocess with the tenant of bench_authorize_rpc.py (6 budgets, 4 rules), 32
callers in flight, blocks alternating so drift hits all alike:
- unary      `AsyncP402Client.authorize`, a unary Authorize RPC per call;
- per-msg    one StreamAuthorize stream, one message per request (written in turn,
             answered in order: what the pipeline did before it batched);
- batches    `AuthorizePipeline.authorize`: one StreamAuthorizeBatches stream, the
             requests waiting together in one message.
Figures: calls/s and client+server CPU per call, each side's median; ratios against
unary. Target: the pipeline's calls/s >= 1.2x unary.

Run: `python benchmarks/bench_authorize_stream.py [--quick]`.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
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
        h.banner("Authorize: unary calls vs one stream (a message per request, per batch)",
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

        one = _OnePerMessage(client)

        async def per_message():
            kw = nxt()
            await one.authorize(kw["model"], **{k: v for k, v in kw.items()
                                                if k != "model"})

        sides = {"unary": unary, "per-msg": per_message, "batches": stream}
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
        await one.aclose()
        await client.close()
    u, cu = h.median(rps["unary"]), h.median(cpu["unary"])
    print(f"32 in flight, {rounds} rounds of {n // rounds} calls per side:")
    for name in sides:
        r, c = h.median(rps[name]), h.median(cpu[name])
        print(f"  {name:8s} {r:8.0f} calls/s ({r / u:5.2f}x unary)   CPU {c * 1e6:6.0f} "
              f"µs/call ({c / cu:4.2f}x; client + server)")
    b = h.median(rps["batches"])
    print(f"pipeline (batches) / unary calls/s: {b / u:.2f}x (target >= 1.2)")


class _OnePerMessage:
    """StreamAuthorize with one message per request: a write at a time, answers in
    order (no retries or timeouts: a benchmark's side, not a client)."""

    def __init__(self, client):
        self._client = client
        self._call = None
        self._lock = asyncio.Lock()
        self._waiting: collections.deque = collections.deque()

    async def authorize(self, model: str, **kw):
        c = self._client
        req = c._authorize_req(model, kw)
        fut = asyncio.get_running_loop().create_future()
        async with self._lock:
            if self._call is None:
                self._call = c._meter.StreamAuthorize(metadata=c._metadata)
                self._reader = asyncio.ensure_future(self._read(self._call))
            self._waiting.append(fut)
            await self._call.write(req)
        msg = await fut
        if msg.WhichOneof("result") == "error":
            raise RuntimeError(msg.error.message)
        return msg.response

    async def _read(self, call):
        async for msg in call:
            self._waiting.popleft().set_result(msg)

    async def aclose(self):
        if self._call is not None:
            await self._call.done_writing()
            await self._reader


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    asyncio.run(main(ap.parse_args().quick))

"""What a gateway adds to every call: `p402 proxy` against a bare forwarder and peers.

Question: what does metering through `p402 proxy` cost a caller, next to forwarding
without metering? Each system stands in front of the same fixed upstream (a minimal
aiohttp app answering a chat completion with usage) and is driven by h2load over
HTTP/1.1, rounds interleaved so the machine's drift hits every system alike:

- upstream     the upstream itself, no gateway (the floor of the latency figures);
- bare         an aiohttp forwarder: parse the body, forward, parse usage; no metering;
- p402 --db    `p402 proxy --db` (P402's runtime in the proxy's process, SQLite);
- p402 --target `p402 proxy --target` in front of `p402 serve` (gRPC, SQLite);
- portkey      Portkey's gateway (Node, no metering), when `npx @portkey-ai/gateway`
               is installed under $P402_BENCH_PORTKEY (a directory with node_modules);
- litellm      LiteLLM's proxy (no database), when `litellm[proxy]` is installed
               (here, or in the Python named by $P402_BENCH_LITELLM_PYTHON).

Two kinds of call, rounds interleaved: whole JSON answers, and streamed answers
(SSE, `--chunks` content chunks written one by one, as a provider sends them; a
quarter of the calls). Figures per system and kind (medians over rounds): added p50
with one connection (its p50
minus the upstream's own, from h2load's per-request log), calls/s at 32 connections,
CPU per call at 32 (user+system time of the gateway's processes, from /proc,
divided by the calls). A P402 proxy answers before its Record commits, so for P402
a run at 32 ends only when every call is in its ledger: "recorded/s" is the calls
per second until then, and the CPU per call counts the recording too (the Records
of one run never spill into the next). Targets: added p50 <= 2x bare's;
calls/s >= 0.5x bare's; CPU per call <= 2x bare's; and against Portkey when present.
Every P402 system's ledger is counted after the run: each call must be there once.

Run: `python benchmarks/bench_gateways.py [--quick] [--rounds N] [--chunks N]` (needs h2load:
Debian's nghttp2-client).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager

import rpc_harness as h  # noqa: E402  (sets sys.path)

BODY = {"model": "gpt-4o-mini", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Summarize the quarterly report."}]}
CLK = os.sysconf("SC_CLK_TCK")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here

_UPSTREAM = r"""
import json, sys
from aiohttp import web
ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
    "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",
    "message": {"role": "assistant", "content": "tok0 tok1 tok2 tok3"}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}).encode()
CHUNKS = int(sys.argv[2])
def sse(body):
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
def chunk(i, usage):  # OpenAI's shape; "usage": null on each when usage was asked
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_1", "choices": [{"index": 0,
            "delta": {"content": f" tok{i}"}, "logprobs": None, "finish_reason": None}]}
    return sse({**body, "usage": None} if usage else body)
STREAM = [[chunk(i, usage) for i in range(CHUNKS)] for usage in (False, True)]
USAGE = sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
             "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 9,
             "completion_tokens": CHUNKS, "total_tokens": CHUNKS + 9}})
async def chat(request):
    body = json.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=ANSWER, content_type="application/json")
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in STREAM[usage]:  # a write per chunk, as a provider sends them
        await resp.write(c)
    if usage:
        await resp.write(USAGE)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
            print=None)
"""

_BARE = r"""
import json, sys
import aiohttp
from aiohttp import web
UP = sys.argv[2]
async def start(app):
    app["s"] = aiohttp.ClientSession()
async def stop(app):
    await app["s"].close()
async def chat(request):
    body = json.loads(await request.read())
    async with request.app["s"].post(UP, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}) as up:
        if body.get("stream"):  # relayed as it comes
            resp = web.StreamResponse(status=up.status,
                                      headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        raw = await up.read()
    json.loads(raw).get("usage")
    return web.Response(body=raw, status=up.status, content_type="application/json")
app = web.Application()
app.on_startup.append(start)
app.on_cleanup.append(stop)
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

_P402_PROXY = r"""
import asyncio, json, sys
sys.path[:0] = {paths!r}
from p402_server.gateways.proxy import ProxyConfig, serve_proxy
async def main():
    target, db = {target!r}, {db!r}
    await serve_proxy(ProxyConfig(upstream={upstream!r}), "127.0.0.1:{port}",
                      target=target, db=db, gc_tuning=True,  # as `p402 proxy` runs
                      ready=lambda port: print("ready", flush=True))
try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""

_INIT = r"""
import asyncio, json, sys
sys.path[:0] = {paths!r}
from p402_server.server import init_tenant
from p402_server.ledger import open_store
async def main():
    store = await open_store({url!r})
    tenant, key = await init_tenant(store, "bench")
    await store.close()
    print(json.dumps({{"api_key": key}}))
asyncio.run(main())
"""

PATHS = [h.ROOT, os.path.join(h.ROOT, "server"), os.path.join(h.ROOT, "clients", "python")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise NotListening(f"nothing listens on {port} after {timeout}s")


class NotListening(RuntimeError):
    """A system under test did not start."""


@contextmanager
def process(argv: list[str], port: int, env: dict | None = None, timeout: float = 60.0):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    try:
        wait_port(port, timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / CLK


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


class Figures:
    """One kind of call's figures for one system, a value per round."""

    def __init__(self) -> None:
        self.p50: list[float] = []
        self.rps: list[float] = []
        self.cpu: list[float] = []
        self.recorded_rps: list[float] = []


class System:
    def __init__(self, name: str, url: str, pids: list[int], headers: list[str],
                 ledger: str | None = None):
        self.name, self.url, self.pids, self.headers = name, url, pids, headers
        self.ledger = ledger
        self.whole, self.stream = Figures(), Figures()  # JSON answers, SSE answers
        self.streams = True  # False: its streamed answers failed; left out
        self.calls = 0


def h2load(url: str, headers: list[str], body_file: str, *, n: int, c: int,
           log: str | None = None) -> float:
    argv = ["h2load", "--h1", "-n", str(n), "-c", str(c), "-m", "1", "-d", body_file,
            "-H", "content-type: application/json"]
    for hd in headers:
        argv += ["-H", hd]
    if log:
        argv += ["--log-file", log]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    ok = next(line for line in out.splitlines() if line.startswith("status codes:"))
    if int(ok.split()[2]) != n:
        raise SystemExit(f"{url}: not every call answered 2xx:\n{out}")
    line = next(line for line in out.splitlines() if line.startswith("finished in"))
    return float(line.split(",")[1].split()[0])  # req/s


def p50_from_log(path: str) -> float:
    with open(path) as f:
        micros = [int(line.split("\t")[2]) for line in f if line.strip()]
    return statistics.median(micros) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=100,
                    help="content chunks of a streamed answer (default 100)")
    args = ap.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found (Debian: apt-get install nghttp2-client)")
    rounds = args.rounds or (2 if args.quick else 5)
    n_seq, n_par = (300, 2000) if args.quick else (1000, 8000)
    tmp = tempfile.mkdtemp(prefix="p402-gw-")
    body_file = os.path.join(tmp, "body.json")
    with open(body_file, "w") as f:
        json.dump(BODY, f)
    stream_file = os.path.join(tmp, "stream.json")
    with open(stream_file, "w") as f:
        json.dump({**BODY, "stream": True}, f)
    h.banner("gateways: what each adds per call (h2load, HTTP/1.1)", "compiled"
             if os.environ.get("P402_NO_EXTENSIONS") != "1" else "python")
    py = sys.executable
    systems: list[System] = []
    with ExitStack() as stack:
        up_port = free_port()
        up = stack.enter_context(process([py, "-c", _UPSTREAM, str(up_port),
                                          str(args.chunks)], up_port))
        up_url = f"http://127.0.0.1:{up_port}/v1"
        systems.append(System("upstream", f"{up_url}/chat/completions", [up.pid], []))

        port = free_port()
        bare = stack.enter_context(process([py, "-c", _BARE, str(port),
                                            f"{up_url}/chat/completions"], port))
        systems.append(System("bare", f"http://127.0.0.1:{port}/v1/chat/completions",
                              [bare.pid], []))

        # p402 proxy --db (embedded)
        db_path = os.path.join(tmp, "embedded.db")
        db = f"sqlite+aiosqlite:///{db_path}"
        key = json.loads(subprocess.run(
            [py, "-c", _INIT.format(paths=PATHS, url=db)], capture_output=True, text=True,
            check=True).stdout.strip().splitlines()[-1])["api_key"]
        port = free_port()
        emb = stack.enter_context(process([py, "-c", _P402_PROXY.format(
            paths=PATHS, target=None, db=db, upstream=up_url, port=port)], port))
        systems.append(System("p402 --db", f"http://127.0.0.1:{port}/v1/chat/completions",
                              [emb.pid], [f"authorization: Bearer {key}",
                                          "x-p402-customer: acme"], ledger=db_path))

        # p402 proxy --target (gRPC to p402 serve)
        info = stack.enter_context(h.server_process())
        port = free_port()
        tgt = stack.enter_context(process([py, "-c", _P402_PROXY.format(
            paths=PATHS, target=f"127.0.0.1:{info['port']}", db=None, upstream=up_url,
            port=port)], port))
        server_pid = _pid_listening(info["port"])
        systems.append(System("p402 --target",
                              f"http://127.0.0.1:{port}/v1/chat/completions",
                              [tgt.pid] + ([server_pid] if server_pid else []),
                              [f"authorization: Bearer {info['api_key']}",
                               "x-p402-customer: acme"], ledger=info.get("ledger")))

        portkey = os.environ.get("P402_BENCH_PORTKEY")
        if portkey and os.path.isdir(os.path.join(portkey, "node_modules")):
            port = free_port()
            pk = stack.enter_context(process(
                [os.path.join(portkey, "node_modules", ".bin", "gateway"), f"--port={port}"],
                port))
            systems.append(System("portkey", f"http://127.0.0.1:{port}/v1/chat/completions",
                                  descendants(pk.pid),
                                  ["x-portkey-provider: openai",
                                   f"x-portkey-custom-host: {up_url}",
                                   "authorization: Bearer sk-bench"]))
        else:
            print("portkey: not run (set P402_BENCH_PORTKEY to a directory where "
                  "`npm install @portkey-ai/gateway` was run)")
        # LiteLLM's proxy pulls many packages: it may live in a venv of its own.
        ll_py = os.environ.get("P402_BENCH_LITELLM_PYTHON", py)
        litellm_ok = subprocess.run([ll_py, "-c", "import litellm.proxy.proxy_server"],
                                    capture_output=True).returncode == 0
        if litellm_ok:
            cfg = os.path.join(tmp, "litellm.yaml")
            with open(cfg, "w") as f:
                f.write("model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n"
                        f"      model: openai/gpt-4o-mini\n      api_base: {up_url}\n"
                        "      api_key: sk-bench\n")
            port = free_port()
            try:
                ll = stack.enter_context(process(
                    [ll_py, "-m", "litellm.proxy.proxy_cli", "--config", cfg, "--port",
                     str(port), "--host", "127.0.0.1"], port, timeout=120.0))
            except NotListening:
                print("litellm: its proxy did not start (pip install 'litellm[proxy]')")
            else:
                systems.append(System("litellm",
                                      f"http://127.0.0.1:{port}/v1/chat/completions",
                                      descendants(ll.pid), ["authorization: Bearer sk-bench"]))
        else:
            print("litellm: not run (pip install 'litellm[proxy]', or set "
                  "P402_BENCH_LITELLM_PYTHON to a Python that has it)")

        for s in systems:  # warm up every path (connections, caches, JIT-free imports)
            h2load(s.url, s.headers, body_file, n=200, c=8)
            s.calls += 200
            try:
                h2load(s.url, s.headers, stream_file, n=50, c=8)
                s.calls += 50
            except SystemExit:
                # Portkey's Node build answers 500 to a custom host's SSE ("TypeError:
                # immutable" in its logs): it is left out of the streamed figures.
                print(f"{s.name}: streamed answers fail (not 2xx); left out of that table")
                s.streams = False
        for r in range(rounds):
            for s in systems:
                if s.streams:
                    _measure(s, stream_file, tmp, f"{r}s", n_seq // 4, n_par // 4, s.stream)
                _measure(s, body_file, tmp, str(r), n_seq, n_par, s.whole)
        for s in systems:
            if s.ledger:
                _check_ledger(s)

    _report(systems, "whole answers", lambda s: s.whole, rounds, n_seq, n_par)
    _report(systems, f"streamed answers ({args.chunks} chunks, SSE)", lambda s: s.stream,
            rounds, n_seq // 4, n_par // 4)


def _measure(s: System, body_file: str, tmp: str, tag: str, n_seq: int, n_par: int,
             into: "Figures") -> None:
    """One round of one system: p50 of n_seq sequential calls, then calls/s and CPU
    per call of n_par at 32 connections (for P402, until all are in the ledger)."""
    log = os.path.join(tmp, f"{tag}-{s.name.replace(' ', '')}.log")
    h2load(s.url, s.headers, body_file, n=n_seq, c=1, log=log)
    into.p50.append(p50_from_log(log))
    s.calls += n_seq
    _wait_recorded(s)  # earlier calls' Records do not count against this run
    cpu0, t0 = cpu_seconds(s.pids), time.perf_counter()
    into.rps.append(h2load(s.url, s.headers, body_file, n=n_par, c=32))
    s.calls += n_par
    if s.ledger:
        # A P402 proxy answers before its Record commits: the run ends when every
        # call is in the ledger, and its CPU counts until then.
        _wait_recorded(s)
        into.recorded_rps.append(n_par / (time.perf_counter() - t0))
    into.cpu.append((cpu_seconds(s.pids) - cpu0) / n_par)


def _report(systems: list[System], title: str, figures, rounds: int, n_seq: int,
            n_par: int) -> None:
    up = figures(systems[0])
    floor = statistics.median(up.p50)
    print(f"\n{title}: upstream alone p50 {floor * 1e3:.2f} ms, "
          f"{statistics.median(up.rps):,.0f} calls/s at 32 ({rounds} rounds of {n_seq} "
          f"sequential + {n_par} at 32)")
    print(f"{'system':<15}{'added p50':>11}{'calls/s @32':>13}{'recorded/s':>12}"
          f"{'CPU/call @32':>14}")
    base = {}
    for s in systems[1:]:
        f = figures(s)
        if not f.p50:
            continue
        added = statistics.median(f.p50) - floor
        rps, cpu = statistics.median(f.rps), statistics.median(f.cpu)
        base[s.name] = (added, rps, cpu)
        rec = f"{statistics.median(f.recorded_rps):,.0f}" if f.recorded_rps else "-"
        print(f"{s.name:<15}{added * 1e3:>9.2f}ms{rps:>13,.0f}{rec:>12}{cpu * 1e3:>12.2f}ms")
    b = base["bare"]
    for name in ("p402 --db", "p402 --target"):
        added, rps, cpu = base[name]
        print(f"ratio {name} / bare: added p50 {_added_ratio(added, b[0], 2)}, "
              f"calls/s {rps / b[1]:.2f}x (target >= 0.5), CPU/call {cpu / b[2]:.2f}x "
              f"(target <= 2)")
        if "portkey" in base:
            pk = base["portkey"]
            print(f"ratio {name} / portkey: added p50 {_added_ratio(added, pk[0], 0.5)}, "
                  f"calls/s {rps / pk[1]:.2f}x (target >= 1)")
        if "litellm" in base:
            ll = base["litellm"]
            print(f"ratio {name} / litellm: calls/s {rps / ll[1]:.2f}x")


# Below this a system's added p50 is within the run's noise (h2load's log has
# microseconds, the upstream's own p50 varies by tens of them between rounds): a
# ratio against it means nothing, so the difference is shown instead. Streams hit
# it: a forwarder relays each chunk as it comes, adding next to nothing to the
# upstream's own time to stream.
MIN_ADDED_S = 50e-6


def _added_ratio(added: float, base: float, target: float) -> str:
    if base < MIN_ADDED_S:
        return (f"{(added - base) * 1e3:+.2f} ms over the peer's (which adds "
                f"{base * 1e3:.2f} ms, under the noise: no ratio)")
    return f"{added / base:.2f}x (target <= {target:g})"


def _pid_listening(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:`port` (from /proc)."""
    inode = None
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                    inode = parts[9]
    if inode is None:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    return None


def _records(path: str) -> int:
    with sqlite3.connect(path) as con:
        return con.execute("select count(*) from events where kind = 'record'").fetchone()[0]


def _wait_recorded(s: System, timeout: float = 120.0) -> None:
    """Until every call answered so far is a record in the system's ledger."""
    if not s.ledger:
        return
    deadline = time.monotonic() + timeout
    while _records(s.ledger) < s.calls:
        if time.monotonic() > deadline:
            raise SystemExit(f"{s.name}: {s.calls - _records(s.ledger)} calls not "
                             f"recorded after {timeout}s")
        time.sleep(0.01)


def _check_ledger(s: System) -> None:
    with sqlite3.connect(s.ledger) as con:
        n = con.execute("select count(*) from events where kind = 'record'").fetchone()[0]
        dup = con.execute("select count(*) - count(distinct reservation_id) from events "
                          "where kind = 'record'").fetchone()[0]
    verdict = "every call once" if n == s.calls and dup == 0 else "MISMATCH"
    print(f"ledger of {s.name}: {n:,} records for {s.calls:,} calls, {dup} duplicates "
          f"({verdict})")


if __name__ == "__main__":
    main()

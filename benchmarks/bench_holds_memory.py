"""How much memory do open holds take? 1M authorizes never recorded, per twin.

Each twin runs in its own subprocess (a fresh heap): build the shared
generator's engine (6 budgets, 20 rules), measure RSS, authorize N requests
(none recorded or released), measure RSS again; report the delta and bytes per
hold. Requests come from `make_requests`: owner tuples from a pool, as a
gateway's callers repeat. `--fresh-owners` builds new owner strings and tuples
for every request instead (what a server decoding each request from the wire
would hold per reservation unless it interns them): the worst case. `--intern`
(with --fresh-owners) takes them through the server's own conversion instead
(p402_server.wire.convert.owners_from_proto on an Owners message: decoded, checked and
interned), which is what `p402 serve` keeps.

Run:  python benchmarks/bench_holds_memory.py [--holds N] [--fresh-owners [--intern]]
Target: compiled < 300 MB for 1M holds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(kind: str, holds: int, fresh: bool, intern: bool = False) -> dict:
    sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "server"),
                    os.path.join(ROOT, "clients", "python")]
    convert = None
    if intern:
        from p402.v1 import common_pb2
        from p402_server.wire import convert
    from conftest import make_engine, make_requests
    import p402core

    impl = p402core.load(kind)
    engine = make_engine(impl, clock=lambda: 1_790_000_000_000)
    base = make_requests(4096)
    gc.collect()
    before = rss_bytes()
    auth = engine.authorize
    for i in range(holds):
        model, owners, labels, nbytes, cap = base[i & 4095]
        if fresh and convert is not None:  # as the server converts a request
            owners = convert.owners_from_proto(common_pb2.Owners(
                **dict(zip(p402core.OWNER_KEYS, ("".join(list(o)) for o in owners)))))
        elif fresh:  # new str objects and a new tuple, as decoded from a request
            owners = tuple("".join(list(o)) for o in owners)
        a = auth(model, owners=owners, labels=labels, input_bytes=nbytes, max_output_tokens=cap)
        if not a.reservation_id:
            raise SystemExit(f"request {i} was denied: {a!r}")
    gc.collect()
    after = rss_bytes()
    assert engine.open_holds() == holds
    return {"kind": kind, "holds": holds, "fresh_owners": fresh, "intern": intern,
            "rss_before": before,
            "rss_after": after}


def run(kind: str, holds: int, fresh: bool, intern: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--holds", str(holds)]
    if fresh:
        cmd.append("--fresh-owners")
    if intern:
        cmd.append("--intern")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--holds", type=int, default=1_000_000)
    ap.add_argument("--fresh-owners", action="store_true")
    ap.add_argument("--intern", action="store_true",
                    help="with --fresh-owners: through the server's owners conversion")
    ap.add_argument("--kinds", default="compiled,python")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.holds, args.fresh_owners, args.intern)))
        return
    sys.path[:0] = [HERE, ROOT]
    from conftest import machine_info
    from p402core import _impl
    print("[machine] " + machine_info())
    kinds = [k for k in args.kinds.split(",") if not (k == "compiled" and _impl.NO_EXTENSIONS)]
    results = {k: run(k, args.holds, args.fresh_owners, args.intern) for k in kinds}
    print(f"{'twin':10s} {'holds':>9s} {'RSS delta MB':>13s} {'bytes/hold':>11s}")
    for k, r in results.items():
        delta = r["rss_after"] - r["rss_before"]
        print(f"{k:10s} {r['holds']:9d} {delta / 2**20:13.1f} {delta / r['holds']:11.0f}")
    if "compiled" in results and "python" in results:
        c = results["compiled"]["rss_after"] - results["compiled"]["rss_before"]
        p = results["python"]["rss_after"] - results["python"]["rss_before"]
        print(f"python / compiled memory: {p / c:.1f}x")
    mode = ("fresh per request, through the server's conversion (interned)" if
            args.fresh_owners and args.intern else "fresh per request" if args.fresh_owners
            else "pooled")
    print(f"owners: {mode}; "
          "target: compiled < 300 MB per 1M holds")


if __name__ == "__main__":
    main()

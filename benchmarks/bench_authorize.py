"""How fast is one metered call through the core: authorize + record (and
authorize + release), compiled engine vs its pure-Python twin, in the same run?

The tenant is the shared generator's (benchmarks/conftest.py): 6 budgets that all
match every request, 20 policy rules of every effect, 6 models, 200 owner sets.
Each timed batch runs N pairs: `authorize(model, owners=…, labels=…,
input_bytes=…, max_output_tokens=…)` then `record(reservation_id,
input_tokens=…, output_tokens=…)` (or `release(reservation_id)`), with the
keyword API a gateway uses; the positional fast path (`authorize_args` /
`record_args`, compiled only) is reported beside it. Set-up is outside the
timed region. Numbers are the best of R batches (the machine is shared), and
the ratio twin / compiled is what to compare across machines.

Run:  /work/venv/bin/python benchmarks/bench_authorize.py [--pairs N] [--repeats R]
or:   /work/venv/bin/python -m pytest benchmarks/bench_authorize.py -q -s
Targets: compiled authorize+record ≤ 1 µs mean; ≥ 30× the twin.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest import machine_info, make_engine, make_requests  # noqa: E402

import p402core  # noqa: E402
from p402core import _impl  # noqa: E402


def pair_loop(engine, reqs):
    auth = engine.authorize
    rec = engine.record
    for model, owners, labels, nbytes, cap in reqs:
        a = auth(model, owners=owners, labels=labels, input_bytes=nbytes, max_output_tokens=cap)
        rec(a.reservation_id, input_tokens=nbytes // 4, output_tokens=200)


def release_loop(engine, reqs):
    auth = engine.authorize
    rel = engine.release
    for model, owners, labels, nbytes, cap in reqs:
        a = auth(model, owners=owners, labels=labels, input_bytes=nbytes, max_output_tokens=cap)
        rel(a.reservation_id)


def positional_loop(engine, reqs):
    auth = engine.authorize_args
    rec = engine.record_args
    for model, owners, labels, nbytes, cap in reqs:
        a = auth(model, "", owners, labels, nbytes, None, cap, 1, 0, "")
        rec(a.reservation_id, "", "", None, None, nbytes // 4, 200, 0, 0, 0, 1, -1)


def check(engine, reqs):
    """The workload is what it claims: every call allowed, 6 budgets, 20 rules."""
    model, owners, labels, nbytes, cap = reqs[0]
    a = engine.authorize(model, owners=owners, labels=labels, input_bytes=nbytes,
                         max_output_tokens=cap)
    assert a.decision in (1, 2) and len(a.budgets) == 6, a
    assert len(engine.rules.rules) == 20
    engine.release(a.reservation_id)


def time_ns_per_op(loop, engine, reqs):
    t = time.perf_counter_ns()
    loop(engine, reqs)
    return (time.perf_counter_ns() - t) / len(reqs)


def best_ns_per_op(loop, engine, reqs, repeats):
    return min(time_ns_per_op(loop, engine, reqs) for _ in range(repeats))


def measure(pairs=20_000, repeats=7, twin_pairs=2_000):
    """Best-of-`repeats` ns per op for each (twin, workload). The twins'
    batches alternate, so a busy machine slows both alike and the ratio holds."""
    reqs = make_requests(pairs)
    kinds = ["python"] if _impl.NO_EXTENSIONS else ["python", "compiled"]
    engines = {}
    for kind in kinds:
        engines[kind] = e = make_engine(p402core.load(kind))
        check(e, reqs)
    loops = [("authorize+record", pair_loop), ("authorize+release", release_loop),
             ("positional a+r", positional_loop)]
    out = {}
    for _ in range(repeats):
        for what, loop in loops:
            for kind in kinds:
                if what == "positional a+r" and kind == "python":
                    continue
                sample = reqs if kind == "compiled" else reqs[:twin_pairs]
                ns = time_ns_per_op(loop, engines[kind], sample)
                key = (kind, what)
                out[key] = min(out.get(key, ns), ns)
    for e in engines.values():
        assert e.open_holds() == 0
    return out


def report(out):
    lines = ["[machine] " + machine_info(),
             f"{'workload':24s} {'python ns':>11s} {'compiled ns':>12s} {'ratio':>7s}"]
    for what in ("authorize+record", "authorize+release", "positional a+r"):
        py = out.get(("python", what))
        c = out.get(("compiled", what))
        if what == "positional a+r":
            py = out.get(("python", "authorize+record"))
        ratio = f"{py / c:6.1f}x" if py and c else "-"
        lines.append(f"{what:24s} {py or 0:11.0f} {c or 0:12.0f} {ratio:>7s}")
    lines.append("targets: compiled authorize+record <= 1000 ns, ratio >= 30x")
    return "\n".join(lines)


def test_authorize_record_ratio(machine, benchmark):
    """pytest-benchmark times the compiled pair loop; the ratio is printed."""
    out = measure(pairs=10_000, repeats=5)
    print("\n" + report(out))
    if not _impl.NO_EXTENSIONS:
        impl = p402core.load("compiled")
        e = make_engine(impl)
        reqs = make_requests(1_000)
        benchmark.pedantic(pair_loop, args=(e, reqs), rounds=20, iterations=1)
        assert e.open_holds() == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(report(measure(args.pairs, args.repeats)))


if __name__ == "__main__":
    main()

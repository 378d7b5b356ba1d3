"""How much faster does the compiled policy core evaluate a realistic rule set
than its pure-Python twin?

Both twins, same run, same seeded data (`conftest.make_rules`: 20 rules of
every effect, scoped like a real tenant's; `conftest.make_requests`: 1,000
requests over 200 owner tuples and 6 models). Set-up (compiling the RuleSet,
building requests) is outside the timed region. Measured per request:

- evaluate: `RuleSet.evaluate(owners, labels, model, provider, privacy_mode)`;
- evaluate+rate: evaluate, then `rate_check` and `rate_consume` on the matching
  RATE_LIMIT rules' buckets (what the engine does on an allowed Authorize).

The ratio reported is python / compiled (how many times faster the compiled
twin is), computed from medians measured in this run, never against a
remembered number.

Run:  /work/venv/bin/python -m pytest benchmarks/bench_policy.py -q
or:   /work/venv/bin/python benchmarks/bench_policy.py
"""
from __future__ import annotations

import os
import sys
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pytest  # noqa: E402

from conftest import T0_MS, machine_info, make_requests, make_rules  # noqa: E402  (puts ROOT on sys.path)

import p402core  # noqa: E402
from p402core import PrivacyMode  # noqa: E402

N_REQUESTS = 1_000
KINDS = ("python", "compiled")
MODE = int(PrivacyMode.METADATA_ONLY)


def setup(kind: str):
    pol = p402core.load(kind).module("policy")
    rs = pol.RuleSet(make_rules(pol))
    reqs = [(owners, labels, model, "openai" if model.startswith("gpt") else "anthropic")
            for model, owners, labels, _bytes, _cap in make_requests(N_REQUESTS)]
    return rs, reqs


def run_evaluate(rs, reqs) -> None:
    evaluate = rs.evaluate
    for owners, labels, model, provider in reqs:
        evaluate(owners, labels, model, provider, MODE)


def run_evaluate_rate(rs, reqs) -> None:
    evaluate, check, consume = rs.evaluate, rs.rate_check, rs.rate_consume
    now = T0_MS
    for owners, labels, model, provider in reqs:
        r = evaluate(owners, labels, model, provider, MODE)
        now += 1
        if not check(r, owners, 1_200, 30_000, now):
            consume(r, owners, 1_200, 30_000, now)


CASES = {"evaluate": run_evaluate, "evaluate+rate": run_evaluate_rate}
_medians: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """After the module: machine, versions and the ratios of this run."""
    yield
    # Printed past pytest's output capture, so the ratio shows without -s.
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled():
        _report()


def _report() -> None:
    write = print
    write("")
    write(f"[machine] {machine_info()}")
    write(f"[versions] p402core twins {KINDS}, {N_REQUESTS} requests x 20 rules")
    for case in CASES:
        py, c = _medians.get((case, "python")), _medians.get((case, "compiled"))
        if py and c:
            write(f"[bench_policy] {case:14s} python {py / N_REQUESTS * 1e9:8.0f} ns/req   "
                  f"compiled {c / N_REQUESTS * 1e9:8.0f} ns/req   ratio python/compiled "
                  f"{py / c:5.1f}x")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_policy(benchmark, case, kind):
    rs, reqs = setup(kind)
    fn = CASES[case]
    benchmark.group = f"policy {case} ({N_REQUESTS} requests)"
    benchmark.pedantic(fn, args=(rs, reqs), rounds=30, warmup_rounds=2, iterations=1)
    if benchmark.stats is not None:          # None under --benchmark-disable
        _medians[(case, kind)] = benchmark.stats.stats.median


def main() -> None:
    print(f"[machine] {machine_info()}")
    for case, fn in CASES.items():
        best = {}
        for kind in KINDS:
            rs, reqs = setup(kind)
            best[kind] = min(timeit.repeat(lambda: fn(rs, reqs), number=1, repeat=30))
        py, c = best["python"], best["compiled"]
        print(f"[bench_policy] {case:14s} python {py / N_REQUESTS * 1e9:8.0f} ns/req   "
              f"compiled {c / N_REQUESTS * 1e9:8.0f} ns/req   ratio python/compiled {py / c:5.1f}x")


if __name__ == "__main__":
    main()

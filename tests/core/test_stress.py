"""Memory-safety regressions of the compiled engine, and a lockstep stress run.

The compiled engine once crashed the server (SIGSEGV in Engine.snapshot at
shutdown). Its holds formed prev/next rings of `@no_gc` objects and the cdef
fast paths trusted typed fields to be non-None; each case below is a way to
break one of those assumptions from plain Python, and each used to kill the
interpreter. They run in a subprocess so a regression fails the test instead
of the test run. The stress test drives both twins with one random sequence
(authorize / record / release / expire / snapshot / restore / restore_holds /
set_budgets / set_catalog / set_rules / leases) with gc.collect() interleaved,
and requires identical results step by step.
"""
from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import textwrap

import pytest

from p402core import Effect, P402Error, _impl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRELUDE = """
import copy, gc, p402core
c = p402core.load("compiled")
cat = c.Catalog([c.ModelPrice("m1", "p", input_pico=1, output_pico=1)], version="v",
                taken="2026-01-01")
"""

# Each snippet must end normally (the misuse raises a clean TypeError or works).
MISUSE = {
    "engine_without_init": """
        try:
            c.Engine.__new__(c.Engine).authorize("m1", input_bytes=1)
        except TypeError:
            pass
    """,
    "copied_engine_shares_holds": """
        e = c.Engine(cat)
        e.authorize("m1", input_bytes=1)
        try:
            e2 = copy.copy(e)
            del e2
        except TypeError:
            pass
        e.authorize("m1", input_bytes=1)
        e.expire(10**13)
        e.snapshot()
    """,
    "book_without_init": """
        b = c.BudgetBook.__new__(c.BudgetBook)
        assert b.match(None) == ()
        b.snapshot()
    """,
    "engine_in_a_collected_cycle": """
        class Owner:
            def __init__(self):
                self.engine = c.Engine(cat, clock=self.clock)
            def clock(self):
                return 1_000_000
        for _ in range(20):
            o = Owner()
            for i in range(2000):
                o.engine.authorize("m1", input_bytes=i, ttl_seconds=1 + i % 50)
            held = o.engine
            del o
            gc.collect()
            held.snapshot()              # still whole: fields survive the GC
            held.expire(10**13)
            del held
            gc.collect()
    """,
    "restore_over_open_holds_then_expire": """
        e = c.Engine(cat)
        for i in range(5000):
            e.authorize("m1", input_bytes=i, ttl_seconds=1 + i % 7)
        s = e.snapshot()
        e.restore(s)
        e.restore(s)
        gc.collect()
        assert len(e.expire(10**13)) == 5000
        e.snapshot()
    """,
}


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="the compiled core is not built")
@pytest.mark.parametrize("case", sorted(MISUSE))
def test_compiled_engine_survives_misuse(case):
    code = PRELUDE + textwrap.dedent(MISUSE[case]) + "\nprint('ok')\n"
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONFAULTHANDLER="1")
    proc = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- lockstep stress ---------------------------------------------------------------------

T0 = 1_790_000_000_000


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def _world(impl, rnd_seed):
    rnd = random.Random(rnd_seed)
    prices = [impl.ModelPrice("m1", "p", input_pico=1_000_000, output_pico=2_000_000,
                              family="gpt", max_output_tokens=2_000),
              impl.ModelPrice("m2", "q", input_pico=150_000, output_pico=600_000,
                              family="claude")]

    def catalog(v):
        return impl.Catalog(prices, version=v, taken="2026-11-01")

    def budgets():
        out = []
        for i in range(rnd.choice([rnd.randint(0, 10), rnd.randint(15, 90)])):
            scope = rnd.choice([None, {"customer": rnd.choice("abcd")},
                                {"feature": rnd.choice("xyz")},
                                {"label.env": rnd.choice(["prod", "dev"])},
                                {"workflow": str(rnd.randint(0, 30))}])
            out.append(impl.Budget(f"b{rnd.randint(0, 40)}" if rnd.random() < .3 else f"c{i}",
                                   rnd.randint(0, 10**9), scope=scope,
                                   period=rnd.choice(["DAY", "MONTH", "TOTAL"]),
                                   enforcement=rnd.choice(["HARD", "SOFT"])))
        seen, uniq = set(), []
        for b in out:
            if b.budget_id not in seen:
                seen.add(b.budget_id)
                uniq.append(b)
        return uniq

    def rules():
        out = [impl.Rule("rate", Effect.RATE_LIMIT, rate_limit=rnd.randint(1, 40),
                         window_seconds=10, per="customer")]
        if rnd.random() < .5:
            out.append(impl.Rule("cap", Effect.MAX_OUTPUT_TOKENS, owners={"feature": "x"},
                                 max_output_tokens=300))
        return out

    return rnd, catalog, budgets, rules


def _drive(impl, seed, steps):
    """One random sequence; returns the list of observable outcomes."""
    rnd, catalog, budgets, rules = _world(impl, seed)
    clock = Clock()
    e = impl.Engine(catalog("v1"), budgets=budgets(), rules=rules(), clock=clock,
                    hold_ttl_seconds=5, fallback_price=impl.ModelPrice("fb", "", input_pico=7,
                                                                       output_pico=7),
                    allow_clamp=True)
    open_ids, log = [], []
    for step in range(steps):
        op = rnd.random()
        try:
            if op < .35:
                a = e.authorize(rnd.choice(["m1", "m2", "zz"]),
                                owners={"customer": rnd.choice("abcd"),
                                        "feature": rnd.choice("xyz"),
                                        "workflow": str(rnd.randint(0, 30))},
                                labels=rnd.choice([None, {"env": "prod"}, {"env": "dev"}]),
                                input_bytes=rnd.randint(0, 5000), ttl_seconds=rnd.randint(0, 8),
                                reservation_id=f"c{rnd.randint(0, 300)}" if rnd.random() < .2
                                else "")
                if a.reservation_id:
                    open_ids.append(a.reservation_id)
                log.append(a.to_dict())
            elif op < .50 and open_ids:
                rid = open_ids.pop(rnd.randrange(len(open_ids)))
                log.append(e.record(rid, input_tokens=rnd.randint(0, 100),
                                    output_tokens=rnd.randint(0, 100),
                                    input_bytes=rnd.randint(0, 2000)).to_dict())
            elif op < .56 and open_ids:
                log.append(e.release(open_ids.pop(rnd.randrange(len(open_ids)))).to_dict())
            elif op < .66:
                clock.now += rnd.randint(0, 3000)
                log.append([s.to_dict() for s in e.expire()])
            elif op < .71:
                snap = e.snapshot()
                log.append(snap)
                if rnd.random() < .5:
                    e.restore(snap)
            elif op < .75:
                records = e.hold_records()
                fresh = impl.Engine(catalog("v9"), budgets=budgets(), rules=rules(),
                                    clock=clock, hold_ttl_seconds=5)
                log.append(fresh.restore_holds(records + records[:3]))
                if rnd.random() < .5:
                    e = fresh
                    open_ids = [r["reservation_id"] for r in records]
            elif op < .80:
                e.set_budgets(budgets())
            elif op < .83:
                e.set_catalog(catalog(f"v{step}"))
            elif op < .86:
                e.set_rules(rules())
            elif op < .90:
                log.append([s.to_dict() for s in e.budget_status()])
                for st in e.budget_status():
                    if rnd.random() < .3:
                        e.set_lease(st.budget_id, rnd.choice([None, rnd.randint(0, 10**8)]))
                log.append(e.lease_status())
        except P402Error as exc:
            log.append((type(exc).__name__, str(exc)))
        if step % 53 == 0:
            gc.collect()
    log.append(e.snapshot())
    return log


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stress_both_twins_agree_under_gc(both, seed):
    py, c = both
    steps = 1500
    # What the test run already holds is frozen out of the collections: each
    # gc.collect() then scans the objects the drives made (the engines' among them)
    # in milliseconds, not a whole suite's heap (0.4 s each, 27 s a seed).
    gc.freeze()
    try:
        assert _drive(c, seed, steps) == _drive(py, seed, steps)
    finally:
        gc.unfreeze()

"""Shared, seeded data for the benchmarks (and usable by anyone: plain functions).

One generator so every benchmark measures the same realistic tenant: a small
catalog of current models, 6 budgets that all match the generated requests
(tenant, customer, feature, department, employee, a label), 20 policy rules of
every effect (most do not fire on a given request, as in production: they are
scoped to other owners or models), and a stream of requests over 200 customers,
12 features and 6 models. Everything is built from `random.Random(seed)` so two
runs, or two twins in one run, see identical data.

Used as a pytest conftest (fixture `machine`, printed once per session) and
imported by the scripts: `from conftest import …` with benchmarks/ on sys.path.
"""
from __future__ import annotations

import os
import platform
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

SEED = 402
T0_MS = 1_790_000_000_000

# model, provider, family, input pico/token, output pico/token, max output tokens
MODELS = (
    ("gpt-4.1", "openai", "gpt", 2_000_000, 8_000_000, 32_768),
    ("gpt-4.1-mini", "openai", "gpt", 400_000, 1_600_000, 32_768),
    ("claude-sonnet-4", "anthropic", "claude", 3_000_000, 15_000_000, 64_000),
    ("claude-haiku-4", "anthropic", "claude", 1_000_000, 5_000_000, 64_000),
    ("gemini-2.5-pro", "google", "gemini", 1_250_000, 10_000_000, 65_536),
    ("gemini-2.5-flash", "google", "gemini", 300_000, 2_500_000, 65_536),
)
N_CUSTOMERS = 200
N_FEATURES = 12
DEPARTMENTS = ("eng", "support", "sales", "research")


def machine_info() -> str:
    """One line: machine, Python, Cython and the core implementation in use."""
    try:
        import Cython
        cython = Cython.__version__
    except ImportError:  # pragma: no cover
        cython = "absent"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu} x{os.cpu_count()} | {platform.system()} {platform.release()} | "
            f"{platform.python_implementation()} {platform.python_version()} | Cython {cython}")


def make_catalog(impl):
    prices = [impl.ModelPrice(m, p, family=f, input_pico=i, output_pico=o, max_output_tokens=mo)
              for m, p, f, i, o, mo in MODELS]
    return impl.Catalog(prices, version="bench-1", taken="2026-11-01")


def make_budgets(impl, *, limit_nanos=10**18):
    """6 budgets, all matching every request from `make_requests` (so every
    authorize reserves on 6 counters). Limits are large: nothing is denied."""
    B = impl.Budget
    return [
        B("tenant-month", limit_nanos, period="MONTH"),
        B("tenant-day", limit_nanos, period="DAY", soft_limit_nanos=limit_nanos // 2),
        B("eng-week", limit_nanos, scope={"department": "eng"}, period="WEEK"),
        B("feature-chat", limit_nanos, scope={"feature": "chat"}, period="MONTH"),
        B("env-prod", limit_nanos, scope={"label.env": "prod"}, period="DAY",
          enforcement="SOFT", soft_limit_nanos=limit_nanos // 2),
        B("customer-0", limit_nanos, scope={"customer": "cust-0000"}, period="TOTAL"),
    ]


def make_rules(impl):
    """20 rules, every effect; scoped like a real tenant's (most do not fire)."""
    from p402core import Effect, PrivacyMode, RateUnit
    R = impl.Rule
    rules = [
        R("require-customer", Effect.REQUIRE_OWNERS, require_owners=("customer", "feature")),
        R("models-allowed", Effect.ALLOW_MODELS, allow_models=("gpt-4.1*", "claude-*", "gemini-*")),
        R("cap-output", Effect.MAX_OUTPUT_TOKENS, max_output_tokens=16_384),
        R("cap-cost", Effect.MAX_COST_PER_REQUEST, max_cost_nanos=5_000_000_000),
        R("privacy", Effect.PRIVACY, allowed_privacy_modes=(PrivacyMode.METADATA_ONLY,
                                                           PrivacyMode.FINGERPRINT_ONLY)),
        R("rate-customer", Effect.RATE_LIMIT, rate_limit=10**9, rate_unit=RateUnit.REQUESTS,
          window_seconds=60, per="customer"),
        R("rate-tokens", Effect.RATE_LIMIT, rate_limit=10**12, rate_unit=RateUnit.TOKENS,
          window_seconds=60, per="feature"),
        R("deny-intern", Effect.DENY, owners={"employee": "intern-7"}),
        R("warn-research-pro", Effect.WARN, owners={"department": "research"},
          models=("gemini-2.5-pro",)),
        R("deny-legacy", Effect.DENY, models=("gpt-3.5*", "text-davinci-*")),
        R("sales-mini-only", Effect.ALLOW_MODELS, owners={"department": "sales"},
          allow_models=("*-mini", "*-flash", "claude-haiku-*")),
        R("support-cap", Effect.MAX_OUTPUT_TOKENS, owners={"department": "support"},
          max_output_tokens=2_048),
        R("eval-cost", Effect.MAX_COST_PER_REQUEST, owners={"workflow": "eval"},
          max_cost_nanos=50_000_000),
        R("label-staging-warn", Effect.WARN, owners={"label.env": "staging"}),
        R("anthropic-privacy", Effect.PRIVACY, providers=("anthropic",),
          allowed_privacy_modes=(PrivacyMode.METADATA_ONLY, PrivacyMode.FINGERPRINT_ONLY,
                                 PrivacyMode.PRIVATE_GATEWAY)),
        R("batch-rate", Effect.RATE_LIMIT, owners={"workflow": "batch"}, rate_limit=10**9,
          rate_unit=RateUnit.COST, window_seconds=3600),
        R("task-owner", Effect.REQUIRE_OWNERS, owners={"feature": "agent"},
          require_owners=("task",)),
        R("deny-customer-x", Effect.DENY, owners={"customer": "cust-blocked"}),
        R("warn-full-trace", Effect.WARN, privacy_modes=(PrivacyMode.FULL_TRACE,)),
        R("google-cap", Effect.MAX_OUTPUT_TOKENS, providers=("google",), max_output_tokens=8_192),
    ]
    assert len(rules) == 20
    return rules


def make_requests(n, seed=SEED):
    """n requests: (model, owners 6-tuple, labels, input_bytes, max_output_tokens).

    Owner tuples come from a pool (a gateway's callers repeat), labels always
    carry env=prod so the label budget matches; every request matches all 6
    budgets of `make_budgets` (customer-0 aside, see below)."""
    rnd = random.Random(seed)
    owners_pool = []
    for c in range(N_CUSTOMERS):
        # customer 0 is everyone's: the 6th budget (customer-0) then matches all
        owners_pool.append(("cust-0000", "chat", "wf-%d" % (c % 7), "", "eng",
                            "emp-%03d" % (c % 50)))
    models = [m[0] for m in MODELS]
    labels = {"env": "prod"}
    out = []
    for _ in range(n):
        out.append((rnd.choice(models), rnd.choice(owners_pool), labels,
                    rnd.randint(200, 40_000), rnd.choice((0, 256, 1024, 4096))))
    return out


def make_engine(impl, *, clock=None, **kw):
    return impl.Engine(make_catalog(impl), budgets=make_budgets(impl), rules=make_rules(impl),
                       clock=clock, **kw)


@pytest.fixture(scope="session")
def machine():
    info = machine_info()
    print("\n[machine] " + info)
    return info

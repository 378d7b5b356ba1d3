"""How fast is pricing one call: `ModelPrice.cost_nanos`, compiled vs its Python
twin, and vs LiteLLM's `cost_per_token` on the same models and usage?

Same run, same data: prices from the shipped default catalog (imported from
LiteLLM's map), three models (plain, cached + cache-write, tiered), a usage of
1,200 input tokens (300 cache reads, 100 cache writes) and 800 output tokens.
Each timed round calls the function 1,000 times in a loop (the loop is part of
the number); the figure is per call. LiteLLM gets the same usage through its
own keyword arguments and its bundled map (LITELLM_LOCAL_MODEL_COST_MAP=True,
no network).

Run:  /work/venv/bin/python -m pytest benchmarks/bench_cost.py --benchmark-only
or:   /work/venv/bin/python benchmarks/bench_cost.py
Targets: compiled cost_nanos ≤ 150 ns; litellm.cost_per_token / compiled ≥ 500×;
compiled cost_units_nanos with a multi-unit usage (audio tokens in and out, a 1-hour
cache write, images: UNITS_CALLS) ≤ 150 ns.
"""
from __future__ import annotations

import os
import platform
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402

import p402core  # noqa: E402
from p402core import _impl  # noqa: E402

MODELS = ("gpt-4o", "claude-sonnet-4-5", "gemini/gemini-2.5-pro")
USAGE = (1200, 800, 300, 100, 0)  # input, output, cached, cache write, reasoning
INNER = 1000  # calls per timed round
# Multi-unit usages: (model, five token counts, units)
UNITS_CALLS = (
    ("gpt-audio", (1200, 800, 300, 0, 0), {"audio_input_tokens": 400,
                                           "audio_output_tokens": 500}),
    ("claude-sonnet-4-5", (5000, 800, 2000, 500, 0), {"cache_write_1h_tokens": 1000,
                                                      "web_search_calls": 2}),
    ("low/1024-x-1024/gpt-image-1", (40, 544, 0, 0, 0), {"images": 2,
                                                         "image_output_tokens": 544}),
)

KINDS = ["python"] if _impl.NO_EXTENSIONS else ["python", "compiled"]
RESULTS: dict = {}  # label -> seconds per call (the fastest round / its calls)


def versions() -> str:
    import Cython

    try:
        from importlib.metadata import version

        lite = version("litellm")
    except Exception:
        lite = "absent"
    return (f"Python {platform.python_version()} | Cython {Cython.__version__} | "
            f"litellm {lite} | core {p402core.IMPLEMENTATION}")


def machine_line() -> str:
    try:
        from conftest import machine_info

        return machine_info()
    except Exception:  # run from elsewhere: the essentials
        return f"{platform.machine()} x{os.cpu_count()} | {platform.system()} {platform.release()}"


def p402_loop(kind: str):
    cat = p402core.load(kind).Catalog.default()
    calls = [cat.lookup(m).cost_nanos for m in MODELS]
    i, o, c, w, r = USAGE

    def run():
        for f in calls:
            for _ in range(INNER // len(calls) + 1):
                f(i, o, c, w, r)

    return run, (INNER // len(calls) + 1) * len(calls)


def p402_units_loop(kind: str):
    cat = p402core.load(kind).Catalog.default()
    calls = [(cat.lookup(m).cost_units_nanos, t, u) for m, t, u in UNITS_CALLS]
    n = INNER // len(calls) + 1

    def run():
        for f, (i, o, c, w, r), u in calls:
            for _ in range(n):
                f(i, o, c, w, r, u)

    return run, n * len(calls)


def litellm_loop():
    import litellm

    i, o, c, w, _r = USAGE
    models = [m.split("/", 1)[-1] if m.startswith("gemini/") else m for m in MODELS]
    providers = ["openai", "anthropic", "gemini"]
    n = 20  # litellm is ~1000x slower: fewer calls per round

    def run():
        for m, prov in zip(models, providers):
            for _ in range(n):
                litellm.cost_per_token(model=m, custom_llm_provider=prov, prompt_tokens=i,
                                       completion_tokens=o, cache_read_input_tokens=c,
                                       cache_creation_input_tokens=w)

    return run, n * len(models)


def check_same_answer():
    """The comparison is fair only if both compute the same cost."""
    import litellm

    cat = p402core.load(KINDS[-1]).Catalog.default()
    i, o, c, w, r = USAGE
    for m, prov in zip(MODELS, ["openai", "anthropic", "gemini"]):
        ours = cat.lookup(m).cost_nanos(i, o, c, w, r)
        a, b = litellm.cost_per_token(model=m.split("/", 1)[-1], custom_llm_provider=prov,
                                      prompt_tokens=i, completion_tokens=o,
                                      cache_read_input_tokens=c, cache_creation_input_tokens=w)
        assert abs(ours - (a + b) * 1e9) <= 1, (m, ours, (a + b) * 1e9)


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    # printed past pytest's output capture, so it shows without -s
    plugins = request.config.pluginmanager
    reporter, capman = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled():
        report(reporter.write_line)


def report(write):
    if not RESULTS:
        return
    write("")
    write(f"[bench_cost] {machine_line()}")
    write(f"[bench_cost] {versions()}")
    for label, sec in RESULTS.items():
        write(f"[bench_cost] {label:<28} {sec * 1e9:>12,.0f} ns/call")
    comp, py, lite = (RESULTS.get(k) for k in ("cost_nanos[compiled]", "cost_nanos[python]",
                                               "litellm.cost_per_token"))
    if comp and py:
        write(f"[bench_cost] python twin / compiled      {py / comp:>12,.1f}x")
    if comp and lite:
        write(f"[bench_cost] litellm / compiled          {lite / comp:>12,.0f}x   (target >= 500x)")
    if comp:
        write(f"[bench_cost] compiled per call           {comp * 1e9:>12,.0f} ns  (target <= 150 ns)")
    units = RESULTS.get("cost_units_nanos[compiled]")
    if units:
        write(f"[bench_cost] compiled multi-unit call    {units * 1e9:>12,.0f} ns  (target <= 150 ns)")


@pytest.mark.parametrize("kind", KINDS)
def test_cost_nanos(benchmark, machine, kind):
    run, calls = p402_loop(kind)
    benchmark.extra_info["calls_per_round"] = calls
    benchmark.pedantic(run, rounds=200, warmup_rounds=5)
    RESULTS[f"cost_nanos[{kind}]"] = benchmark.stats.stats.min / calls


@pytest.mark.parametrize("kind", KINDS)
def test_cost_units_nanos(benchmark, machine, kind):
    run, calls = p402_units_loop(kind)
    benchmark.extra_info["calls_per_round"] = calls
    benchmark.pedantic(run, rounds=200, warmup_rounds=5)
    RESULTS[f"cost_units_nanos[{kind}]"] = benchmark.stats.stats.min / calls


def test_litellm_cost_per_token(benchmark, machine):
    pytest.importorskip("litellm", reason="litellm is not installed")
    check_same_answer()
    run, calls = litellm_loop()
    benchmark.extra_info["calls_per_round"] = calls
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    RESULTS["litellm.cost_per_token"] = benchmark.stats.stats.min / calls


def main() -> None:
    def best(run, calls, rounds):
        run()
        return min(_timed(run) for _ in range(rounds)) / calls

    for kind in KINDS:
        RESULTS[f"cost_nanos[{kind}]"] = best(*p402_loop(kind), rounds=200)
        RESULTS[f"cost_units_nanos[{kind}]"] = best(*p402_units_loop(kind), rounds=200)
    try:
        check_same_answer()
        RESULTS["litellm.cost_per_token"] = best(*litellm_loop(), rounds=10)
    except ImportError:
        pass
    report(print)


def _timed(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

"""How fast is the tokenizer-free estimate of a 4 KB prompt: `Estimator.estimate_content`,
compiled vs its Python twin, vs counting tokens with LiteLLM's `token_counter`?

Same run, same data: a seeded 4,096-byte prompt (English prose and Python code,
ASCII), the default catalog's gpt-4o price, an output cap of 1,024. Measured:
`estimate_content` on the `str` and on its UTF-8 `bytes`, and on a 4 KB prompt
with non-ASCII text (German and Japanese), for both twins; and
`litellm.token_counter(model="gpt-4o", text=prompt)` (tiktoken o200k underneath),
which is what a gateway would otherwise call before pricing. Each timed round
loops the call (the loop is part of the number); the figure is per call.

Run:  /work/venv/bin/python -m pytest benchmarks/bench_estimate.py --benchmark-only
or:   /work/venv/bin/python benchmarks/bench_estimate.py
Target: litellm.token_counter / compiled estimate_content >= 1000x.
"""
from __future__ import annotations

import os
import random
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
from bench_cost import machine_line, versions  # noqa: E402

KINDS = ["python"] if _impl.NO_EXTENSIONS else ["python", "compiled"]
SIZE = 4096
CAP = 1024
RESULTS: dict = {}

_PROSE = ("The finance team reviews every model call by feature and customer, and the "
          "budget for the support assistant resets on the first day of each month. ")
_CODE = ("def total_cost(events):\n    return sum(e.cost_nanos for e in events "
         "if e.outcome == Outcome.SUCCESS)\n\n")
_INTL = "Die Kosten werden pro Aufruf gebucht. 料金はトークン単位で計算されます。"


def make_prompt(seed: int = 402, *, intl: bool = False) -> str:
    rnd = random.Random(seed)
    parts, size = [], 0
    while size < SIZE:
        piece = rnd.choice((_PROSE, _CODE, _INTL if intl else _PROSE))
        parts.append(piece)
        size += len(piece.encode())
    text = "".join(parts)
    raw = text.encode()[:SIZE]
    return raw.decode("utf-8", "ignore")


def estimate_loop(kind: str, content, inner: int = 1000):
    impl = p402core.load(kind)
    price = impl.Catalog.default().lookup("gpt-4o")
    f = impl.Estimator().estimate_content

    def run():
        for _ in range(inner):
            f(price, content, CAP)

    return run, inner


def litellm_loop(prompt: str, inner: int = 20):
    import litellm

    def run():
        for _ in range(inner):
            litellm.token_counter(model="gpt-4o", text=prompt)

    return run, inner


CASES = [("str", lambda: make_prompt()), ("bytes", lambda: make_prompt().encode()),
         ("str-non-ascii", lambda: make_prompt(intl=True))]


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capman = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled():
        report(reporter.write_line)


def report(write):
    if not RESULTS:
        return
    write("")
    write(f"[bench_estimate] {machine_line()}")
    write(f"[bench_estimate] {versions()}")
    for label, sec in RESULTS.items():
        write(f"[bench_estimate] {label:<36} {sec * 1e9:>12,.0f} ns/call")
    lite = RESULTS.get("litellm.token_counter")
    for case, _ in CASES:
        comp, py = RESULTS.get(f"estimate_content[compiled-{case}]"), RESULTS.get(f"estimate_content[python-{case}]")
        if comp and py:
            write(f"[bench_estimate] python twin / compiled ({case:<13})  {py / comp:>8,.1f}x")
        if comp and lite:
            write(f"[bench_estimate] litellm / compiled ({case:<13})      {lite / comp:>8,.0f}x"
                  "   (target >= 1000x)")


@pytest.mark.parametrize("case", [c for c, _ in CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_estimate_content(benchmark, machine, kind, case):
    content = dict(CASES)[case]()
    assert len(content if isinstance(content, bytes) else content.encode()) <= SIZE
    run, calls = estimate_loop(kind, content)
    benchmark.pedantic(run, rounds=100, warmup_rounds=3)
    RESULTS[f"estimate_content[{kind}-{case}]"] = benchmark.stats.stats.min / calls


def test_litellm_token_counter(benchmark, machine):
    pytest.importorskip("litellm", reason="litellm is not installed")
    run, calls = litellm_loop(make_prompt())
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    RESULTS["litellm.token_counter"] = benchmark.stats.stats.min / calls


def main() -> None:
    def best(run, calls, rounds):
        run()
        best_t = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            run()
            best_t = min(best_t, time.perf_counter() - t)
        return best_t / calls

    for kind in KINDS:
        for case, make in CASES:
            RESULTS[f"estimate_content[{kind}-{case}]"] = best(*estimate_loop(kind, make()), rounds=100)
    try:
        RESULTS["litellm.token_counter"] = best(*litellm_loop(make_prompt()), rounds=10)
    except ImportError:
        pass
    report(print)


if __name__ == "__main__":
    main()

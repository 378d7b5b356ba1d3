"""benchmarks/report.py: the Markdown report and the latency histogram of `p402 bench`."""
from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
import xml.etree.ElementTree as ET

from tests.proof.harness import ROOT


def _report():
    spec = importlib.util.spec_from_file_location("p402_bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_report_has_figures_ratios_and_histogram(tmp_path):
    report = _report()
    doc = {"bench": "authorize_rpc",
           "figures": [{"name": "Authorize p50 / Ping p50", "value": 1.2, "target": "<= 1.10",
                        "met": False, "measured_us": 120.0, "baseline_us": 100.0}],
           "latencies_us": {"ping": [100.0, 110.0, 95.0] * 10,
                            "authorize": [120.0, 130.0, 500.0] * 10}}
    results = [
        report.Result("bench_authorize_rpc.py", 0, 1.5,
                      ["machine: x\n", "  p50 1.200x  (target <= 1.10)  MISS\n",
                       "BENCH_JSON " + json.dumps(doc) + "\n"]),
        report.Result("bench_cost.py", 3, 0.5, ["[bench_cost] litellm / compiled  1,404x\n",
                                                "generated 10 events\n"]),
    ]
    path = report.write_report(results, quick=True, out_dir=tmp_path,
                               now=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc))
    text = path.read_text()
    assert path.name.startswith("2026-01-02-")
    assert "| bench_authorize_rpc.py | Authorize p50 / Ping p50 | 1.200x | 120 µs | 100 µs | <= 1.10 | no |" in text
    assert "FAILED (exit 3)" in text
    assert "1,404x" in text and "generated 10 events" in text  # ratio line, full output
    assert "BENCH_JSON" not in text
    svg = next(tmp_path.glob("*-latency.svg"))
    root = ET.fromstring(svg.read_text())  # well-formed
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    # Every sample lands in a bin: the shares of each series add up to 100 %.
    for name in ("Ping (no-op)", "Authorize"):
        shares = [float(t.split(": ")[1].split("%")[0]) for t in titles if t.startswith(name)]
        assert abs(sum(shares) - 100.0) < 0.5, (name, shares)

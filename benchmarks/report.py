"""The benchmark report behind `p402 bench`.

Owns turning the output of every `benchmarks/bench_*.py` run (each a subprocess,
streamed by the CLI) into one Markdown report, `<out_dir>/<date>-<machine>.md`, and a
latency histogram of Authorize vs Ping (`…-latency.svg` beside it). `p402 bench`
chooses `out_dir` (`--report-dir`, default outside the source tree); the reports
kept in `benchmarks/reports/` are copied there by hand.

What it reads from each script's output:
- a `BENCH_JSON {...}` line, when the script prints one: `figures` (name, value = the
  ratio, target, met, and the measured / baseline numbers) and, for the RPC bench,
  `latencies_us` (sequential latencies of each call, for the histogram);
- otherwise every line that states a ratio against a target ("… 1.03x (target <= 1.10)
  OK" and the like), verbatim; such a line also becomes a row of the Figures table
  (`figures_from_lines`: its ratio, target and verdict), so no table stays empty.
The full output of each script is kept in the report too (a collapsed section), with
the machine and versions the scripts print beside their numbers.

Used as a library (`write_report(results, …)`) by `p402 bench`, or run on its own:
`python benchmarks/report.py [--quick]` runs every script and writes the report.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_JSON = "BENCH_JSON "
# A line that states a ratio ("... 1.03x (target <= 1.10) OK", "1,404x", "ratio 0.57x")
# or the targets themselves.
_RATIO = re.compile(r"\d[\d,]*(?:\.\d+)?\s?[x\u00d7]\b|\btargets?\b", re.I)


@dataclass
class Result:
    """One benchmark script's run."""
    script: str
    returncode: int
    seconds: float
    output: list[str] = field(default_factory=list)

    @property
    def data(self) -> list[dict]:
        out = []
        for line in self.output:
            if line.startswith(BENCH_JSON):
                try:
                    out.append(json.loads(line[len(BENCH_JSON):]))
                except json.JSONDecodeError:
                    pass
        return out

    @property
    def ratio_lines(self) -> list[str]:
        return [ln.strip() for ln in self.output
                if not ln.startswith(BENCH_JSON) and _RATIO.search(ln)]


_VALUE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s?[x\u00d7](?![\w])")


def figures_from_lines(lines: list[str]) -> list[dict]:
    """Figures (name, value, target, met) read from printed ratio lines: the first
    "N.NNx" of a line is its ratio, the text before it its name, "(target …)" its
    target and OK / MISS its verdict (None when the line gives none)."""
    out = []
    for line in lines:
        m = _VALUE.search(line)
        if not m:
            continue
        name = line[:m.start()].strip(" :=-") or line.strip()
        t = re.search(r"target\s*([^)]*?)(?:\)|:|$)", line, re.I)
        verdict = re.search(r"\b(OK|MISS(?:ED)?|met|not met)\b", line, re.I)
        met = None
        if verdict:
            met = verdict.group(1).lower() in ("ok", "met")
        out.append({"name": name, "value": float(m.group(1).replace(",", "")),
                    "target": t.group(1).strip() if t else "", "met": met})
    return out


def machine_name() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname() or "machine").strip("-")
    return f"{name or 'machine'}-{os.cpu_count()}cpu"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("grpcio", "protobuf", "SQLAlchemy", "aiosqlite", "Cython", "uvloop",
                 "litellm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        import p402core

        out["p402core"] = getattr(p402core, "IMPLEMENTATION", "?")
    except Exception as exc:  # noqa: BLE001 - the report says what it could not load
        out["p402core"] = f"unavailable ({type(exc).__name__})"
    return out


def _mem_gib() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kb = int(fh.readline().split()[1])
        return f"{kb / 2**20:.1f} GiB"
    except OSError:
        return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- the histogram


def latency_svg(series: dict[str, list[float]], *, title: str, width: int = 720,
                height: int = 320, bins: int = 40) -> str:
    """Overlaid histograms (log-spaced µs bins) of each series' latencies, as SVG."""
    values = [v for vs in series.values() for v in vs if v > 0]
    if not values:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60">'
                f'<text x="10" y="30">{html.escape(title)}: no samples</text></svg>')
    lo = math.log10(max(1.0, min(values)))
    hi = math.log10(sorted(values)[int(len(values) * 0.999) - 1 if len(values) > 1 else 0]
                    * 1.05)
    hi = max(hi, lo + 0.1)
    edges = [10 ** (lo + (hi - lo) * i / bins) for i in range(bins + 1)]
    counts = {}
    for name, vs in series.items():
        c = [0] * bins
        for v in vs:
            if v <= 0:
                continue
            i = int((math.log10(v) - lo) / (hi - lo) * bins)
            c[min(max(i, 0), bins - 1)] += 1
        counts[name] = [x / max(1, len(vs)) for x in c]  # share of calls per bin
    top = max(max(c) for c in counts.values()) or 1.0
    ml, mr, mt, mb = 60, 20, 40, 50
    pw, ph = width - ml - mr, height - mt - mb
    colours = ["#4c78a8", "#f58518", "#54a24b", "#e45756"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{ml}" y="22" font-size="14" font-weight="bold">'
             f'{html.escape(title)}</text>']
    bw = pw / bins
    for k, (name, c) in enumerate(counts.items()):
        col = colours[k % len(colours)]
        for i, share in enumerate(c):
            if share:
                h = share / top * ph
                parts.append(f'<rect x="{ml + i * bw:.1f}" y="{mt + ph - h:.1f}" '
                             f'width="{bw:.1f}" height="{h:.1f}" fill="{col}" '
                             f'fill-opacity="0.55"><title>{html.escape(name)}: '
                             f'{share:.1%} of calls in {edges[i]:.0f}–{edges[i + 1]:.0f} µs'
                             f'</title></rect>')
        p50 = sorted(series[name])[len(series[name]) // 2]
        parts.append(f'<rect x="{width - mr - 190}" y="{mt + 4 + k * 18}" width="12" '
                     f'height="12" fill="{col}" fill-opacity="0.55"/>'
                     f'<text x="{width - mr - 172}" y="{mt + 14 + k * 18}">'
                     f'{html.escape(name)} (p50 {p50:.0f} µs, n={len(series[name])})</text>')
    parts.append(f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" '
                 f'stroke="black"/>')
    for i in range(0, bins + 1, max(1, bins // 8)):
        x = ml + i * bw
        parts.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" '
                     f'stroke="black"/><text x="{x:.1f}" y="{mt + ph + 18}" '
                     f'text-anchor="middle">{edges[i]:.0f}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 10}" text-anchor="middle">'
                 f'latency (µs, log scale), sequential calls</text>')
    parts.append(f'<text x="14" y="{mt + ph / 2}" transform="rotate(-90 14 {mt + ph / 2})" '
                 f'text-anchor="middle">share of calls</text></svg>')
    return "\n".join(parts)


# ---------------------------------------------------------------- the report


def write_report(results: list[Result], *, quick: bool, out_dir: Path | None = None,
                 now: _dt.datetime | None = None) -> Path:
    """Write the Markdown report (and the SVG when there are latencies) -> its path."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    out_dir = out_dir or HERE / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y-%m-%d}-{machine_name()}"
    md_path = out_dir / f"{stem}.md"
    lines = [f"# P402 benchmark report — {now:%Y-%m-%d %H:%M} UTC", "",
             f"- machine: {_cpu_model()}, {os.cpu_count()} CPUs, {_mem_gib()} RAM, "
             f"{platform.platform()}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
             f"- mode: {'--quick (short runs: smoke numbers, not the final word)' if quick else 'full'}",
             "- every figure is a ratio against a baseline measured in the same run "
             "(never a remembered time)", ""]
    lines += ["## Figures", "", "| benchmark | figure | ratio | measured | baseline | target | met |",
              "|---|---|---|---|---|---|---|"]
    histogram = None
    for r in results:
        figures = [f for doc in r.data for f in doc.get("figures", [])]
        if not figures:  # a script without BENCH_JSON: its printed ratio lines
            figures = figures_from_lines(r.ratio_lines)
        for f in figures:
            measured = f.get("measured_us", f.get("measured"))
            baseline = f.get("baseline_us", f.get("baseline"))
            unit = " µs" if "measured_us" in f else ""
            met = {True: "yes", False: "no"}.get(f.get("met"), "")
            lines.append(
                f"| {r.script} | {f['name']} | {f['value']:.3f}x | "
                f"{_num(measured)}{unit} | {_num(baseline)}{unit} | {f.get('target', '')} | "
                f"{met} |")
        for doc in r.data:
            if doc.get("latencies_us") and histogram is None:
                histogram = doc["latencies_us"]
    lines += ["", "## Ratio lines as printed by each benchmark", ""]
    for r in results:
        status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
        lines.append(f"### {r.script} — {status}, {r.seconds:.1f} s")
        lines.append("")
        ratio_lines = r.ratio_lines
        if ratio_lines:
            lines += ["```", *ratio_lines, "```"]
        else:
            lines.append("(no ratio line; see the full output)")
        lines.append("")
    if histogram:
        svg_path = out_dir / f"{stem}-latency.svg"
        series = {{"ping": "Ping (no-op)", "authorize": "Authorize"}.get(k, k): v
                  for k, v in histogram.items()}
        svg_path.write_text(latency_svg(series, title="Authorize vs Ping latency over gRPC"),
                            encoding="utf-8")
        lines += ["## Latency histogram", "", f"![Authorize vs Ping latency]({svg_path.name})",
                  ""]
    lines += ["## Full output", ""]
    for r in results:
        lines += [f"<details><summary>{r.script}</summary>", "", "```",
                  *[ln.rstrip("\n") for ln in r.output if not ln.startswith(BENCH_JSON)],
                  "```", "", "</details>", ""]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path


def _num(x) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"


def run_scripts(scripts: list[Path], *, quick: bool, echo=None) -> list[Result]:
    """Run each script as a subprocess (stderr merged), echoing lines as they come."""
    import time

    env = dict(os.environ)
    if quick:
        env["P402_BENCH_QUICK"] = "1"
    results = []
    for script in scripts:
        argv = [sys.executable, str(script)]
        if quick and "--quick" in script.read_text(encoding="utf-8", errors="replace"):
            argv.append("--quick")
        if echo:
            echo(f"── {script.name} {' '.join(argv[2:])}\n")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=script.parent.parent, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        out = []
        for line in proc.stdout:
            out.append(line)
            if echo and not line.startswith(BENCH_JSON):
                echo(line)
        proc.wait()
        results.append(Result(script.name, proc.returncode, time.monotonic() - t0, out))
    return results


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ns = ap.parse_args()
    res = run_scripts(sorted(HERE.glob("bench_*.py")), quick=ns.quick, echo=sys.stdout.write)
    print(f"report: {write_report(res, quick=ns.quick)}")
    sys.exit(0 if all(r.returncode == 0 for r in res) else 1)

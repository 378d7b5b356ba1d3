"""`p402 demo` as the README promises it: the tour shows ALLOW, WARN and DENY;
`--keep-running --http` serves the dashboard with the tour's events and prints how to
sign in; the workflows write nothing to stderr and leave no temporary files."""
from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("P402_HTTP", "P402_LISTEN")}
    paths = [str(ROOT), str(ROOT / "server"), str(ROOT / "clients" / "python")]
    e["PYTHONPATH"] = os.pathsep.join(paths + [e.get("PYTHONPATH", "")])
    e.update(extra)
    return e


def demo(*argv: str, tmp: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p402_server.cli", "demo", *argv],
                          env=env(TMPDIR=str(tmp)), cwd=tmp, capture_output=True,
                          text=True, timeout=180, **kw)


def test_the_tour_shows_allow_warn_and_deny(tmp_path):
    proc = demo(tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Sent (\d+) Authorize \((\d+) allow, (\d+) deny, (\d+) warn\)",
                  proc.stdout)
    assert m, proc.stdout
    allow, deny, warn = (int(g) for g in m.groups()[1:])
    assert allow > 0 and deny > 0 and warn > 0
    assert "budget.soft_limit" in proc.stdout
    ledger = proc.stdout.split("Ledger:")[1].split("Spend by customer")[0]
    for decision in ("allow", "warn", "deny"):
        assert re.search(rf"\s{decision}\s", ledger), (decision, ledger)
    assert proc.stderr == ""  # no SDK log lines for the WARN decisions
    assert list(tmp_path.iterdir()) == []  # the temporary ledger is gone


def test_workflows_leave_no_temporary_files_and_log_nothing(tmp_path):
    proc = demo("--workflow", "all", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warn" in proc.stdout.lower()  # code-review's alice is warned …
    # … and the SDK does not print it to stderr (only the export's progress is there).
    assert "p402 WARN" not in proc.stderr and "budget.soft_limit" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def _sign_in_and_read_ledger(url: str, key: str) -> str:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    base = url.split("/dashboard/")[0]
    with opener.open(base + "/dashboard/signin", timeout=10) as r:
        csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "api_key": key, "next": ""}).encode()
    with opener.open(base + "/dashboard/signin", data=form, timeout=10) as r:
        assert "/dashboard/meter/events" in r.url
    with opener.open(url, timeout=10) as r:
        return r.read().decode()


def test_keep_running_with_http_serves_the_tour_in_the_dashboard(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "p402_server.cli", "demo", "--keep-running",
         "--listen", "127.0.0.1:0"], env=env(TMPDIR=str(tmp_path), P402_HTTP="127.0.0.1:0"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = []
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            out.append(line)
            if "Serving until Ctrl-C" in line or time.monotonic() > deadline:
                break
        text = "".join(out)
        url = re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/dashboard/meter/events)",
                        text)
        key = re.search(r"sign in with the read key (p402_\w+)", text)
        assert url and key, text
        page = _sign_in_and_read_ledger(url.group(1), key.group(1))
        assert page.count("data-event-id=") >= 15  # the tour's events
        assert "decision-warn" in page and "decision-deny" in page
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0

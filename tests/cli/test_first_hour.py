"""The CLI as a new user meets it in the first hour: what `init` and `serve` say on a
fresh or a shared database, a taken port, a build without the compiled core,
read commands that never create a database, a pasted key with a newline, and one
error prefix everywhere."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import p402_client as pc
import p402core
from p402_server.cli import main
from tests.cli.test_cli import run, run_json, subprocess_env
from tests.client.serverthread import free_port


def cli(*argv: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p402_server.cli", *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("p402: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- init


def test_init_refuses_a_second_tenant_unless_asked(tmp_path, capsys):
    db = f"sqlite+aiosqlite:///{tmp_path / 'p402.db'}"
    first = run_json(capsys, "init", "--db", db)
    code, out, err = run(capsys, "init", "--db", db)
    assert code == 2 and out == ""
    assert err.startswith("p402: error: init: ") and "already has 1 tenant(s)" in err
    assert first["tenant"] in err and "--new-tenant" in err
    second = run_json(capsys, "init", "--db", db, "--new-tenant", "--name", "other")
    assert second["tenant"] != first["tenant"]
    code, _out, err = run(capsys, "init", "--db", db)
    assert code == 2 and "already has 2 tenant(s)" in err


# ---------------------------------------------------------------- serve


def _serve_until(db: str, listen: str, needle: str, *extra: str, timeout: float = 30):
    """Start `p402 serve`, wait for `needle` in its log, SIGTERM it -> (rc, log)."""
    proc = subprocess.Popen([sys.executable, "-m", "p402_server.cli", "serve", "--db", db,
                             "--listen", listen, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if needle in line or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    return proc.returncode, "".join(lines) + rest


def test_serve_on_an_empty_database_says_run_init(tmp_path):
    db = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    rc, log = _serve_until(db, "127.0.0.1:0", "listening on")
    assert rc == 0, log
    assert "no tenant in" in log and f"p402 init --db {db}" in log
    # With a tenant, no such warning.
    assert cli("init", "--db", db, "--json").returncode == 0
    rc, log = _serve_until(db, "127.0.0.1:0", "listening on")
    assert rc == 0 and "no tenant" not in log, log


@pytest.mark.parametrize("which", ["--listen", "--http"])
def test_serve_on_a_taken_port_names_it_and_the_way_out(tmp_path, which):
    db = f"sqlite+aiosqlite:///{tmp_path / 'p402.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"127.0.0.1:{port}" if which == "--listen" else "127.0.0.1:0"
        extra = ["--http", f"127.0.0.1:{port}"] if which == "--http" else []
        proc = cli("serve", "--db", db, "--listen", listen, *extra)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in line
    env = "P402_LISTEN" if which == "--listen" else "P402_HTTP"
    assert f"choose another with {which} HOST:PORT (env {env})" in line
    assert "add_port.cc" not in proc.stderr  # gRPC core's own log line


@pytest.mark.parametrize("mode", ["--db", "--target"])
def test_proxy_on_a_taken_port_names_it_and_the_way_out(tmp_path, mode):
    where = (f"sqlite+aiosqlite:///{tmp_path / 'p402.db'}" if mode == "--db"
             else "127.0.0.1:9")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("proxy", mode, where, "--upstream", "http://127.0.0.1:9",
                   "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in line
    assert "choose another with --listen HOST:PORT (env P402_PROXY_LISTEN)" in line
    assert "Unclosed" not in proc.stderr  # the upstream session was closed
    assert not (tmp_path / "p402.db").exists()  # refused before the ledger was opened


BLOCK_COMPILED = """
import importlib.abc, sys
class NoCompiledCore(importlib.abc.MetaPathFinder):
    # As if the install was built with P402_NO_EXTENSIONS=1: no p402core._*_c module.
    def find_spec(self, name, path=None, target=None):
        if name.startswith("p402core._") and name.endswith("_c"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoCompiledCore())
from p402_server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_without_the_compiled_core_fails_at_start_with_the_hint(tmp_path):
    if p402core.IMPLEMENTATION != "compiled":
        pytest.skip("P402_NO_EXTENSIONS=1: the compiled core is not asked for")
    db = f"sqlite+aiosqlite:///{tmp_path / 'p402.db'}"
    proc = subprocess.run([sys.executable, "-c", BLOCK_COMPILED, "serve", "--db", db,
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "the compiled core is not built" in line and "P402_NO_EXTENSIONS=1" in line
    assert "compiled" not in proc.stderr.replace(line, "")  # never claimed in the log
    assert not (tmp_path / "p402.db").exists()  # it failed before touching the store


def test_the_loaded_core_is_described_as_it_is():
    assert p402core.load("python").check().describe().startswith("pure-Python twins")
    if p402core.IMPLEMENTATION == "compiled":
        assert p402core.load("compiled").check().describe() == "compiled (8 Cython modules)"


# ---------------------------------------------------------------- read commands


@pytest.mark.parametrize("argv", [["verify", "--db"], ["contents", "purge", "--db"]])
def test_read_commands_never_create_a_database(tmp_path, capsys, argv):
    missing = tmp_path / "typo.db"
    code, _out, err = run(capsys, *argv, f"sqlite+aiosqlite:///{missing}")
    assert code == 2
    assert err.startswith("p402: error: --db: no database at ") and str(missing) in err
    assert not missing.exists()
    # An existing file that is not a P402 ledger: bad input too, no SQL dump.
    other = tmp_path / "other.db"
    other.write_bytes(b"")
    code, _out, err = run(capsys, *argv, f"sqlite:///{other}")
    assert code == 2 and "is not a P402 database" in err
    assert "[SQL:" not in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- keys and errors


def test_a_key_with_a_trailing_newline_works_and_a_broken_one_is_refused(tenant, capsys):
    _tenant_id, key = tenant
    code, out, err = run(capsys, "ping", "--api-key", key + "\n", "--json")
    assert code == 0, err
    assert json.loads(out)["tenant"] == _tenant_id
    code, _out, err = run(capsys, "ping", "--api-key", key[:10] + "\n" + key[10:])
    assert code == 2
    assert err == ("p402: error: --api-key: contains whitespace or control characters; "
                   "a P402 key is p402_ followed by letters and digits\n")
    # The SDK does the same for gateways.
    with pc.P402Client(_serve_target(), api_key=key + "\r\n") as client:
        assert client.ping().tenant == _tenant_id
    with pytest.raises(pc.InvalidArgument) as exc:
        pc.P402Client(_serve_target(), api_key="p402_a\x00b")
    assert exc.value.field == "api_key"


def _serve_target() -> str:
    return os.environ["P402_TARGET"]


@pytest.mark.parametrize("argv", [
    ["keys", "create", "--scope", "bogus"],
    ["budgets", "set", "x", "--limit", "abc"],
    ["events", "--since", "yesterday"],
    ["verify"],
    ["export", "--format", "xml"],
])
def test_every_usage_error_has_the_one_prefix(tenant, capsys, argv):
    code, _out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("p402: error: ") and err.count("\n") == 1, err


# ---------------------------------------------------------------- prices


def test_prices_import_reads_the_map_litellm_ships(tenant, capsys):
    import importlib.util

    if importlib.util.find_spec("litellm") is None:
        pytest.skip("the litellm extra is not installed (pip install -e '.[litellm]')")
    doc = run_json(capsys, "prices", "import", "--from-litellm-package")
    assert doc["imported_count"] > 100
    (price,) = [p for p in run_json(capsys, "prices", "list", "--model", "gpt-4o-mini")
                if p["model"] == "gpt-4o-mini"]
    assert price["tenant_override"]


def test_prices_import_says_where_the_map_comes_from(tenant, capsys, tmp_path):
    code, _out, err = run(capsys, "prices", "import",
                          str(tmp_path / "model_prices_and_context_window.json"))
    assert code == 2
    assert "--from-litellm-package" in err and "BerriAI/litellm" in err
    code, out, _err = run(capsys, "prices", "import", "--help")
    assert code == 0 and "model_prices_and_context_window_backup.json" in out
    code, _out, err = run(capsys, "prices", "import")  # neither a file nor the flag
    assert code == 2 and err.startswith("p402: error: ")


# ---------------------------------------------------------------- tables and money


def _long_events(server, api_key: str) -> None:
    with pc.P402Client(server.target, api_key=api_key) as client:
        for model, customer in (("gpt-4o-mini", "acme"), ("gpt-4.1-mini", "globex-intl"),
                                ("gpt-4o", "initech")):
            a = client.authorize(model, owners={"customer": customer,
                                                "feature": "summarize"},
                                 input_bytes=4000, max_output_tokens=300)
            client.record(a.reservation_id, input_tokens=987, output_tokens=123)


@pytest.mark.parametrize("width", [80, 120])
def test_events_table_reads_at_the_terminal_width(tenant, server, capsys, monkeypatch,
                                                  width):
    _long_events(server, tenant[1])
    events = run_json(capsys, "events")
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = run(capsys, "events")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= width, out
    assert f"not shown at {width} columns" in out
    for e in events:  # every event is one line: its time, model and cost intact
        when = e["event_time_ms"]
        import datetime as dt

        stamp = dt.datetime.fromtimestamp(when / 1000, dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S")
        (line,) = [ln for ln in lines if f" {e['owners']['customer']} " in ln]
        assert line.strip().startswith(stamp) and f" {e['model']} " in line
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run(capsys, "events")
    assert "not shown" not in out and "reasons" in out and "evidence" in out


def _amounts(line: str) -> list:
    from decimal import Decimal

    return [Decimal(m.replace(",", "")) * (-1 if sign else 1)
            for sign, m in __import__("re").findall(r"(-?)\$([\d,]+\.\d+)", line)]


def test_spend_rows_add_up_and_margin_is_revenue_minus_cost(tenant, server, capsys):
    from tests.cli.test_cli import _record_mix

    _record_mix(server, tenant[1])
    code, out, _ = run(capsys, "spend", "--by", "customer,feature")
    assert code == 0
    lines = out.splitlines()
    rows = [ln for ln in lines if ln.strip().startswith(("acme", "globex"))]
    (total,) = [ln for ln in lines if ln.strip().startswith("total")]
    sums = [sum(col) for col in zip(*(_amounts(r) for r in rows))]
    assert sums == _amounts(total)  # exact: the displayed rows add up
    for r in rows:
        cost, revenue, margin = _amounts(r)
        assert margin == revenue - cost
    (search,) = [r for r in rows if "search" in r]  # cost, no revenue reported
    cost, revenue, margin = _amounts(search)
    assert revenue == 0 and margin == -cost < 0
    assert "*" in search and "no revenue reported" in out
    # One precision per column: every cost has the same number of decimals.
    costs = [__import__("re").findall(r"\$[\d,]+\.(\d+)", r)[0] for r in rows]
    assert len({len(c) for c in costs}) == 1


# ---------------------------------------------------------------- bench


def _bench_dir(tmp_path):
    import shutil
    from pathlib import Path

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "benchmarks" / "report.py", bench)
    (bench / "bench_ratio.py").write_text(
        "print('Authorize / Ping p50   1.07x  (target <= 1.10)  OK')\n"
        "print('cache hit ratio 3.50x (target >= 4): MISS')\n")
    return bench


def test_bench_report_goes_where_the_user_says_with_its_figures(tmp_path, capsys):
    bench = _bench_dir(tmp_path)
    reports = tmp_path / "my-reports"
    code, out, _ = run(capsys, "bench", "--dir", str(bench), "--report-dir", str(reports))
    assert code == 0
    (md,) = reports.glob("*.md")
    assert f"report: {md}" in out
    assert not (bench / "reports").exists()  # nothing written beside the scripts
    table = md.read_text().split("## Figures")[1].split("## Ratio lines")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| bench_ratio.py")]
    assert rows == ["| bench_ratio.py | Authorize / Ping p50 | 1.070x |  |  | <= 1.10 | yes |",
                    "| bench_ratio.py | cache hit ratio | 3.500x |  |  | >= 4 | no |"]


def test_bench_report_defaults_outside_the_tree(tmp_path, capsys, monkeypatch):
    bench = _bench_dir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("P402_BENCH_REPORTS", raising=False)
    code, out, _ = run(capsys, "bench", "--dir", str(bench))
    assert code == 0
    assert list((tmp_path / "xdg" / "p402" / "bench-reports").glob("*.md"))
    assert not (bench / "reports").exists()
    blocked = tmp_path / "file"
    blocked.write_text("")
    code, _out, err = run(capsys, "bench", "--dir", str(bench), "--report-dir",
                          str(blocked / "sub"))
    assert code == 2 and err.startswith("p402: error: --report-dir: ")

"""The `p402` CLI, in-process (main(argv) -> exit code, output through capsys) against a
real server, and as a subprocess for init and the demo."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import p402_client as pc
from p402_server.cli import main, parse_time, parse_usd, UsageError

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o-mini"
USD = 1_000_000_000


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "server"), str(ROOT / "clients" / "python")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------- parsing


def test_parse_usd_is_exact():
    assert parse_usd("--limit", "25.00") == 25 * USD
    assert parse_usd("--limit", "$0.000000001") == 1
    assert parse_usd("--limit", "0.1") == 100_000_000  # no float rounding
    assert parse_usd("--limit", "1e2") == 100 * USD
    for bad in ("1.0000000001", "-1", "abc", "NaN", "inf", ""):
        with pytest.raises(UsageError) as exc:
            parse_usd("--limit", bad)
        assert exc.value.flag == "--limit"


def test_parse_time_forms():
    now = 1_750_000_000_000
    assert parse_time("--since", "30m", now) == now - 30 * 60_000
    assert parse_time("--since", "24h", now) == now - 86_400_000
    assert parse_time("--since", "7d", now) == now - 7 * 86_400_000
    assert parse_time("--since", "2025-06-01", now) == 1_748_736_000_000
    assert parse_time("--since", "2025-06-01T00:00:00+02:00", now) == 1_748_728_800_000
    assert parse_time("--since", "2025-06-01T00:00:00Z", now) == 1_748_736_000_000
    for bad in ("yesterday", "7x", "2025-13-01", "-5d"):
        with pytest.raises(UsageError):
            parse_time("--since", bad, now)


# ---------------------------------------------------------------- init and exit codes


def test_init_json_prints_exactly_tenant_and_key(tmp_path, capsys):
    from tests.client.serverthread import ServerThread

    db = f"sqlite+aiosqlite:///{tmp_path / 'init.db'}"
    doc = run_json(capsys, "init", "--db", db, "--name", "acme-corp")
    assert set(doc) == {"tenant", "api_key"}
    assert doc["api_key"].startswith("p402_")
    st = ServerThread(db).start()
    try:
        with pc.P402Client(st.target, api_key=doc["api_key"]) as client:
            assert client.ping().tenant == doc["tenant"]
            assert client.list_keys().items[0].scopes == (pc.Scope.ADMIN,)
    finally:
        st.stop()


@pytest.mark.parametrize("db", ["mysql://x/y", "nonsense", "sqlite:////no-such-dir/x.db"])
def test_init_bad_db_exits_2_naming_db(capsys, db):
    code, out, err = run(capsys, "init", "--db", db, "--json")
    assert code == 2 and out == ""
    assert err.startswith("p402: error: --db: ") and "db: db" not in err


def test_init_subprocess_json(tmp_path):
    db = f"sqlite+aiosqlite:///{tmp_path / 'sub.db'}"
    proc = subprocess.run([sys.executable, "-m", "p402_server.cli", "init", "--db", db,
                           "--json"], capture_output=True, text=True, timeout=60,
                          env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"tenant", "api_key"}


@pytest.mark.parametrize("argv, flag", [
    (["budgets", "set", "b", "--limit", "1.0000000001"], "--limit"),
    (["budgets", "set", "b", "--limit", "ten"], "--limit"),
    (["budgets", "set", "b", "--limit", "5", "--soft-limit", "6"], "--soft-limit"),
    (["budgets", "set", "b", "--limit", "5", "--scope", "team=x"], "--scope"),
    (["events", "--since", "last tuesday"], "--since"),
    (["spend", "--since", "3 fortnights"], "--since"),
    (["spend", "--by", "customer,colour"], "--by"),
    (["events", "--limit", "0"], "--limit"),
    (["events", "--limit", "٣"], "--limit"),
    (["events", "--limit", str(2**70)], "--limit"),
    (["policies", "set", "r", "--effect", "rate_limit"], "--rate-limit"),
    (["policies", "set", "r", "--effect", "max_cost_per_request", "--max-cost",
      "0.0000000001"], "--max-cost"),
    (["settings", "set"], "settings set"),
])
def test_bad_input_exits_2_naming_the_flag(tenant, capsys, argv, flag):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith(f"p402: error: {flag}:")
    assert err.count("\n") == 1  # one line


def test_missing_api_key_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("P402_API_KEY", raising=False)
    code, _out, err = run(capsys, "budgets", "list")
    assert code == 2
    assert err == "p402: error: --api-key: is required (or set P402_API_KEY)\n"


def test_argparse_errors_exit_2(capsys):
    code, _out, err = run(capsys, "budgets", "frobnicate")
    assert code == 2 and "invalid choice" in err and err.count("\n") == 1
    code, _out, err = run(capsys, "export", "--format", "xml", "--api-key", "k")
    assert code == 2 and "--format" in err


def test_server_errors_exit_1_with_status(tenant, capsys):
    code, _out, err = run(capsys, "budgets", "delete", "no-such-budget")
    assert code == 1
    assert err.startswith("p402: error: NOT_FOUND: ")
    code, _out, err = run(capsys, "ping", "--api-key", "p402_" + "z" * 40)
    assert code == 1 and "UNAUTHENTICATED" in err
    code, _out, err = run(capsys, "ping", "--target", "127.0.0.1:9", "--timeout", "1")
    assert code == 1 and "UNAVAILABLE" in err


def test_server_side_invalid_argument_exits_2_naming_the_field(tenant, capsys):
    code, _out, err = run(capsys, "events", "--customer", "x" * 300)
    assert code == 2
    assert err.startswith("p402: error: filter.owners.customer:")


def test_every_command_has_help_with_an_example(capsys):
    commands = [["serve"], ["init"], ["ping"], ["keys", "create"], ["keys", "list"],
                ["keys", "revoke"], ["budgets", "set"], ["budgets", "list"],
                ["budgets", "delete"], ["policies", "set"], ["policies", "list"],
                ["policies", "delete"], ["policies", "load"], ["prices", "import"],
                ["prices", "list"], ["events"], ["spend"], ["export"], ["settings", "get"],
                ["settings", "set"], ["bench"], ["demo"]]
    for cmd in commands:
        code, out, _err = run(capsys, *cmd, "--help")
        assert code == 0
        assert "example:\n  p402 " + cmd[0] in out, cmd


# ---------------------------------------------------------------- remote commands


def test_budgets_set_list_delete_round_trip(tenant, capsys):
    code, out, err = run(capsys, "budgets", "set", "acme-monthly", "--limit", "25.00",
                         "--period", "month", "--soft-limit", "20", "--scope",
                         "customer=acme", "--scope", "label.env=prod")
    assert code == 0, err
    assert "acme-monthly" in out
    run(capsys, "budgets", "set", "chat-daily", "--limit", "$5", "--period", "day",
        "--soft", "--scope", "feature=chat")
    budgets = {b["budget_id"]: b for b in run_json(capsys, "budgets", "list")}
    acme = budgets["acme-monthly"]
    assert acme["limit_nanos"] == 25 * USD and acme["limit_usd"] == "25.000000000"
    assert acme["soft_limit_nanos"] == 20 * USD
    assert acme["period"] == "MONTH" and acme["enforcement"] == "HARD"
    assert acme["scope"] == {"customer": "acme", "label.env": "prod"}
    assert acme["status"]["remaining_nanos"] == 25 * USD
    chat = budgets["chat-daily"]
    assert (chat["period"], chat["enforcement"], chat["limit_nanos"]) == ("DAY", "SOFT",
                                                                          5 * USD)
    code, out, _ = run(capsys, "budgets", "list")
    assert code == 0 and "acme-monthly" in out and "$25.00" in out
    assert run(capsys, "budgets", "delete", "chat-daily")[0] == 0
    assert [b["budget_id"] for b in run_json(capsys, "budgets", "list")] == ["acme-monthly"]


def test_keys_create_list_revoke(tenant, capsys, server):
    created = run_json(capsys, "keys", "create", "--scope", "meter", "--scope", "read",
                       "--name", "gw")
    assert created["api_key"].startswith("p402_")
    assert sorted(created["key"]["scopes"]) == ["METER", "READ"]
    listed = {k["key_id"]: k for k in run_json(capsys, "keys", "list")}
    assert listed[created["key"]["key_id"]]["name"] == "gw"
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and created["key"]["key_id"] in out
    assert run(capsys, "keys", "revoke", created["key"]["key_id"])[0] == 0
    code, _out, err = run(capsys, "ping", "--api-key", created["api_key"])
    assert code == 1 and "UNAUTHENTICATED" in err


def test_policies_set_load_list_delete(tenant, capsys, tmp_path):
    assert run(capsys, "policies", "set", "need-customer", "--effect", "require_owners",
               "--require-owner", "customer")[0] == 0
    assert run(capsys, "policies", "set", "rl", "--effect", "rate_limit", "--rate-limit",
               "0.50", "--rate-unit", "cost", "--window", "3600", "--per", "customer",
               "--match", "feature=search")[0] == 0
    rules = {r["rule_id"]: r for r in run_json(capsys, "policies", "list")}
    assert rules["need-customer"]["require_owners"] == ["customer"]
    assert rules["rl"]["rate_limit"] == USD // 2 and rules["rl"]["rate_unit"] == "COST"
    assert rules["rl"]["owners"] == {"feature": "search"}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [
        {"rule_id": "cap", "effect": "MAX_COST_PER_REQUEST", "max_cost": "0.25"},
        {"rule_id": "models", "effect": "ALLOW_MODELS", "allow_models": ["gpt-4o*"]},
    ]}))
    doc = run_json(capsys, "policies", "load", str(path), "--replace")
    assert doc == {"loaded": ["cap", "models"], "deleted": ["need-customer", "rl"]}
    rules = {r["rule_id"]: r for r in run_json(capsys, "policies", "list")}
    assert set(rules) == {"cap", "models"}
    assert rules["cap"]["max_cost_nanos"] == USD // 4
    path.write_text(json.dumps([{"rule_id": "x", "effect": "DENY", "colour": "red"}]))
    code, _out, err = run(capsys, "policies", "load", str(path))
    assert code == 2 and err.startswith("p402: error: rules[0].colour:")
    assert run(capsys, "policies", "delete", "cap")[0] == 0


def test_settings_get_set(tenant, capsys):
    before = run_json(capsys, "settings", "get")
    after = run_json(capsys, "settings", "set", "--hold-ttl", "600", "--allow-clamp")
    assert after["hold_ttl_seconds"] == 600 and after["allow_clamp"] is True
    assert after["default_output_tokens"] == before["default_output_tokens"]
    code, _out, err = run(capsys, "settings", "set", "--hold-ttl", "-3")
    assert code == 2 and err.startswith("p402: error: --hold-ttl:")


def test_prices_import_and_list(tenant, capsys, tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"acme-llm-2": {
        "litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 2e-06,
        "output_cost_per_token": 8e-06}}))
    doc = run_json(capsys, "prices", "import", str(path), "--format", "litellm")
    assert doc["imported_count"] == 1
    (price,) = run_json(capsys, "prices", "list", "--model", "acme-llm")
    assert price["input_pico_per_token"] == 2_000_000 and price["tenant_override"]
    code, out, _ = run(capsys, "prices", "list", "--model", "acme-llm")
    assert code == 0 and "$2" in out and "$8" in out  # USD per million tokens


def _record_mix(server, api_key):
    rows = [("acme", "chat", 1000, 100, 5_000_000), ("acme", "search", 3000, 10, 0),
            ("globex", "chat", 500, 500, 1_000_000), ("globex", "chat", 700, 20, 0)]
    with pc.P402Client(server.target, api_key=api_key) as client:
        return client.record_batch([
            {"model": MODEL, "owners": {"customer": c, "feature": f}, "input_tokens": i,
             "output_tokens": o, "revenue_nanos": r} for c, f, i, o, r in rows]), rows


def test_spend_json_matches_what_was_recorded(tenant, capsys, server):
    results, rows = _record_mix(server, tenant[1])
    doc = run_json(capsys, "spend", "--by", "customer,feature", "--since", "1h")
    assert doc["group_by"] == ["customer", "feature"]
    expected: dict[tuple[str, str], dict[str, int]] = {}
    for res, (c, f, i, o, r) in zip(results, rows):
        e = expected.setdefault((c, f), {"events": 0, "cost": 0, "in": 0, "out": 0, "rev": 0})
        e["events"] += 1
        e["cost"] += res.cost_nanos
        e["in"] += i
        e["out"] += o
        e["rev"] += r
    got = {(row["group"]["customer"], row["group"]["feature"]): row for row in doc["rows"]}
    assert set(got) == set(expected)
    for key, e in expected.items():
        row = got[key]
        assert row["event_count"] == e["events"]
        assert row["cost_nanos"] == e["cost"]
        assert row["usage"]["input_tokens"] == e["in"]
        assert row["usage"]["output_tokens"] == e["out"]
        assert row["revenue_nanos"] == e["rev"]
        assert row["margin_nanos"] == e["rev"] - e["cost"]
    total = sum(r.cost_nanos for r in results)
    assert doc["totals"]["cost_nanos"] == total
    assert doc["totals"]["event_count"] == 4
    assert doc["totals"]["cost_usd"] == f"{total // USD}.{total % USD:09d}"
    # The table: one row per group plus the totals row.
    code, out, _ = run(capsys, "spend", "--by", "customer")
    assert code == 0
    assert "acme" in out and "globex" in out and "total" in out
    # Filters narrow the rows.
    doc = run_json(capsys, "spend", "--by", "feature", "--customer", "globex")
    assert [r["group"]["feature"] for r in doc["rows"]] == ["chat"]
    assert doc["totals"]["event_count"] == 2


def test_events_newest_first(tenant, capsys, server):
    results, _rows = _record_mix(server, tenant[1])
    events = run_json(capsys, "events", "--limit", "3")
    assert [e["event_id"] for e in events] == [r.event_id for r in results[::-1][:3]]
    assert events[0]["cost_usd"]
    only = run_json(capsys, "events", "--customer", "acme", "--since", "1h")
    assert {e["owners"]["customer"] for e in only} == {"acme"} and len(only) == 2
    code, out, _ = run(capsys, "events")
    assert code == 0 and "globex" in out and MODEL in out


def test_export_csv_and_jsonl(tenant, capsys, server, tmp_path):
    results, rows = _record_mix(server, tenant[1])
    out_csv = tmp_path / "events.csv"
    code, _out, err = run(capsys, "export", "--format", "csv", "--output", str(out_csv))
    assert code == 0, err
    assert "Exported 4 event(s)" in err  # on stderr, beside the progress bar
    with open(out_csv, newline="") as fh:
        records = list(csv.DictReader(fh))
    assert [r["event_id"] for r in records] == [r.event_id for r in results]  # ledger order
    assert [(r["customer"], r["feature"]) for r in records] == [(c, f) for c, f, *_ in rows]
    assert [int(r["cost_nanos"]) for r in records] == [r.cost_nanos for r in results]
    assert [int(r["input_tokens"]) for r in records] == [i for _c, _f, i, _o, _r in rows]
    assert records[0]["outcome"] == "SUCCESS"
    code, out, _ = run(capsys, "export", "--format", "jsonl", "--customer", "globex")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["event_id"] for d in lines] == [r.event_id for r in results[2:]]
    assert lines[0]["usage"]["output_tokens"] == 500
    assert lines[0]["revenue_nanos"] == 1_000_000
    # An empty export is still a valid CSV: the header alone.
    code, out, _ = run(capsys, "export", "--customer", "nobody")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [list(records[0].keys())]


# ---------------------------------------------------------------- bench, serve, demo


def test_bench_runs_each_script_and_reports(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_ok.py").write_text(
        "import os, sys\n"
        "print('ok-bench argv', sys.argv[1:], 'quick env', os.environ.get('P402_BENCH_QUICK'))\n"
        "# accepts --quick\n")
    (bench / "bench_fails.py").write_text("import sys\nprint('boom'); sys.exit(3)\n")
    (bench / "helper.py").write_text("raise SystemExit('not a benchmark: never run')\n")
    code, out, _ = run(capsys, "bench", "--quick", "--dir", str(bench))
    assert code == 1  # one script failed
    assert "ok-bench argv ['--quick'] quick env 1" in out
    assert "boom" in out and "failed (exit 3)" in out
    assert "not a benchmark" not in out
    code, out, _ = run(capsys, "bench", "--dir", str(bench), "--only", "ok")
    assert code == 0 and "ok-bench argv [] quick env None" in out
    code, _out, err = run(capsys, "bench", "--dir", str(bench), "--only", "nothing")
    assert code == 2 and err.startswith("p402: error: --only:")


def test_serve_listens_and_stops_on_sigterm(tmp_path):
    import signal
    import time

    from tests.client.serverthread import free_port

    db = f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}"
    init = subprocess.run([sys.executable, "-m", "p402_server.cli", "init", "--db", db,
                           "--json"], capture_output=True, text=True, timeout=60,
                          env=subprocess_env())
    key = json.loads(init.stdout)["api_key"]
    port = free_port()
    env = subprocess_env()
    env["P402_LISTEN"] = f"127.0.0.1:{port}"  # the environment is read as the default
    proc = subprocess.Popen([sys.executable, "-m", "p402_server.cli", "serve", "--db", db],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 30
        with pc.P402Client(f"127.0.0.1:{port}", api_key=key, retries=0) as client:
            while True:  # the child imports, migrates, then listens
                try:
                    assert client.ping().tenant == json.loads(init.stdout)["tenant"]
                    break
                except pc.Unavailable:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"port {port}" in out and "stopped" in out


def test_serve_rejects_a_bad_listen_address(capsys):
    code, _out, err = run(capsys, "serve", "--listen", "localhost")
    assert code == 2 and err.startswith("p402: error: --listen:")


def test_demo_runs_to_completion(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "p402_server.cli", "demo"],
                          capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Spend by customer" in out and "Spend by feature" in out
    for customer in ("acme", "globex", "initech", "umbrella"):
        assert customer in out
    assert "budget.exceeded" in out and "policy.rate_limited" in out
    assert "policy.owner_missing" in out
    assert "duplicate=True" in out
    assert "P402_API_KEY=p402_" in out
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_receipts_get_and_verify_offline_with_exit_codes(tenant, capsys, server, tmp_path):
    with pc.P402Client(server.target, api_key=tenant[1]) as p402:
        r = p402.record(model="gpt-4o-mini", owners={"customer": "acme"}, input_tokens=900,
                        output_tokens=100, want_receipt=True)
    assert r.receipt
    code, out, err = run(capsys, "receipts", "get", r.event_id)
    assert code == 0 and out.strip() == r.receipt
    receipt = tmp_path / "r.json"
    receipt.write_text(out)
    code, out, _ = run(capsys, "keys", "evidence", "--public")
    assert code == 0 and json.loads(out)["keys"][0]["status"] == "active"
    keys = tmp_path / "keys.json"
    keys.write_text(out)
    # valid: 0, no server or key needed
    os.environ.pop("P402_API_KEY", None)
    doc = run_json(capsys, "receipts", "verify", str(receipt), "--keys", str(keys))
    assert doc["ok"] and doc["event_id"] == r.event_id and doc["cost_nanos"] == r.cost_nanos
    # tampered: 1
    forged = json.loads(r.receipt)
    forged["cost_nanos"] = 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(forged))
    code, out, _ = run(capsys, "receipts", "verify", str(bad), "--keys", str(keys))
    assert code == 1 and "INVALID" in out
    # unknown key (a set without it): 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": [{"public_key_hex": "11" * 32}]}))
    code, out, _ = run(capsys, "receipts", "verify", str(receipt), "--keys", str(other))
    assert code == 1 and "unknown key" in out
    # bad usage: 2
    code, _, err = run(capsys, "receipts", "verify", str(tmp_path / "missing.json"),
                       "--keys", str(keys))
    assert code == 2 and "FILE" in err
    code, _, err = run(capsys, "receipts", "verify", str(receipt), "--keys", str(receipt))
    assert code == 2 and "--keys" in err


def test_pricebook_set_and_show(tenant, capsys, tmp_path):
    book = tmp_path / "book.json"
    book.write_text(json.dumps({"markup_pct": "25", "customers": {"acme": {"markup_pct": "5"}}}))
    code, out, err = run(capsys, "pricebook", "set", str(book))
    assert code == 0, err
    set_doc = json.loads(out)
    assert set_doc["version"].startswith("pb-")
    code, out, _ = run(capsys, "pricebook", "show")
    assert json.loads(out) == set_doc
    book.write_text(json.dumps({"markup_pct": "a lot"}))
    code, _, err = run(capsys, "pricebook", "set", str(book))
    assert code == 2 and "markup_pct" in err
    book.write_text("{not json")
    code, _, err = run(capsys, "pricebook", "set", str(book))
    assert code == 2 and "FILE" in err


def test_statements_close_show_and_verify(tenant, capsys, server, tmp_path):
    import datetime as dt

    when = int(dt.datetime(2026, 10, 9, tzinfo=dt.timezone.utc).timestamp() * 1000)
    with pc.P402Client(server.target, api_key=tenant[1]) as p402:
        costs = [p402.record(model="gpt-4o-mini", owners={"customer": c, "feature": "chat"},
                             input_tokens=5000, output_tokens=500, event_time_ms=when).cost_nanos
                 for c in ("acme", "acme", "globex")]
    code, out, err = run(capsys, "statements", "close", "--period", "2026-10")
    assert code == 0, err
    docs = {d["customer"]: d for d in json.loads(out)}
    assert docs["acme"]["totals"]["cost_nanos"] == costs[0] + costs[1]
    code, out, _ = run(capsys, "statements", "show", "--period", "2026-10", "--customer",
                       "acme", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][0] == "section" and rows[-1][0] == "total"
    code, out, _ = run(capsys, "statements", "show", "--period", "2026-10", "--customer",
                       "acme")
    st = tmp_path / "st.json"
    st.write_text(out)
    code, keys_json, _ = run(capsys, "keys", "evidence")
    keys = tmp_path / "keys.json"
    keys.write_text(keys_json)
    assert run(capsys, "statements", "verify", str(st), "--keys", str(keys))[0] == 0
    assert run(capsys, "statements", "verify", str(st), "--ledger")[0] == 0
    forged = json.loads(out)
    forged["totals"]["cost_nanos"] += 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(forged))
    assert run(capsys, "statements", "verify", str(bad), "--keys", str(keys))[0] == 1
    assert run(capsys, "statements", "verify", str(bad), "--ledger")[0] == 1
    # against an export of the ledger: the whole tenant's events (jsonl, with its digest)
    export = tmp_path / "ledger.jsonl"
    assert run(capsys, "export", "--format", "jsonl", "--output", str(export))[0] == 0
    assert run(capsys, "statements", "verify", str(st), "--keys", str(keys), "--export",
               str(export))[0] == 0
    # an export with an event cut out is broken (its chain and digest say so)
    lines = export.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[1:]) + "\n")
    code, out2, _ = run(capsys, "statements", "verify", str(cut), "--keys", str(keys))
    assert code == 1
    code, out2, _ = run(capsys, "statements", "verify", str(st), "--keys", str(keys),
                        "--export", str(cut))
    assert code == 1 and "broken" in out2
    # a sound export of other events (globex only) does not back acme's statement
    other = tmp_path / "globex.jsonl"
    assert run(capsys, "export", "--format", "jsonl", "--customer", "globex", "--output",
               str(other))[0] == 0
    code, out2, _ = run(capsys, "statements", "verify", str(st), "--keys", str(keys),
                        "--export", str(other))
    assert code == 1 and "differs from the export" in out2
    code, _, err = run(capsys, "statements", "close", "--period", "2026-13")
    assert code == 2 and "period" in err
    code, _, err = run(capsys, "statements", "verify", str(st))
    assert code == 2

"""Commands that start something: `serve` (the gRPC server), `proxy` (the
OpenAI-compatible metering proxy), `init` (a tenant and its first key), `ping`,
`bench` (the benchmarks, with a report) and `demo` (the tour)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p402_server.cli.common import (
    DEFAULT_DB,
    DEFAULT_LISTEN,
    DEFAULT_TARGET,
    UsageError,
    _client,
    _fmt,
    _json_flag,
    _listen_check,
    _redact_url,
    _remote,
    _run_store,
)
from p402_server.cli.output import Output


def _log_flags(p: argparse.ArgumentParser) -> None:
    """--log-format and --log-level of the commands that run a server or a proxy."""
    p.add_argument("--log-format", default=os.environ.get("P402_LOG_FORMAT", "text"),
                   choices=("text", "json"), type=str.lower,
                   help="text (default) or json: one JSON object per line with the "
                        "request id (the caller's x-request-id, else a new one); env "
                        "P402_LOG_FORMAT")
    p.add_argument("--log-level", default=os.environ.get("P402_LOG_LEVEL", "INFO"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                   help="logging level (default INFO)")


def _configure_logs(args: argparse.Namespace) -> None:
    from p402_server.observe import logs

    logs.configure(args.log_level, args.log_format)
    if args.log_level != "DEBUG":  # migration chatter is not news on every start
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _gc_check() -> None:
    """P402_GC (gc_policy.py) refused before anything starts, naming the variable."""
    from p402_server.gc_policy import thresholds_from_env

    try:
        thresholds_from_env(os.environ.get("P402_GC"))
    except ValueError as exc:
        raise UsageError("P402_GC", str(exc).removeprefix("P402_GC: ")) from None


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    _listen_check("--listen", args.listen)
    _gc_check()
    if args.max_concurrent_rpcs is not None and args.max_concurrent_rpcs <= 0:
        raise UsageError("--max-concurrent-rpcs", "must be > 0")
    import p402core

    # Before anything starts: a build without the compiled core fails here, with
    # the way out, and the start-up log names the core that really loaded.
    core = p402core.load(p402core.IMPLEMENTATION).check()
    _configure_logs(args)
    from p402_server import server

    kwargs: dict[str, Any] = {}
    if args.max_concurrent_rpcs is not None:
        kwargs["max_concurrent_rpcs"] = args.max_concurrent_rpcs
    if args.http:  # the dashboard, in the same process and loop
        _listen_check("--http", args.http)
        from p402_server.dashboard import DashboardConfig

        kwargs["http"] = args.http
        kwargs["dashboard_config"] = DashboardConfig(
            secure_cookies=True if args.http_secure_cookies else None,
            metrics_token=os.environ.get("P402_METRICS_TOKEN", ""))
    if args.ext_authz:  # Envoy ext_authz on the same port (p402_server.gateways.envoy)
        try:
            from p402_server.gateways.envoy import EnvoyConfig
        except ImportError as exc:
            raise UsageError("--ext-authz", f"needs xds-protos (pip install "
                             f"'p402[envoy]'): {exc}") from None
        kwargs["ext_authz"] = EnvoyConfig(
            provider=args.ext_authz_provider,
            strip_authorization=args.ext_authz_strip_authorization)
    # Scale-out: leases on/off, and --workers N (workers.py).
    if args.workers < 1:
        raise UsageError("--workers", "must be >= 1")
    if args.workers > 1 and args.lease == "off":
        raise UsageError("--lease", "several workers share budgets: leases must be on")
    kwargs["leases"] = args.lease == "on" or args.workers > 1
    if args.no_metrics:
        kwargs["metrics"] = False
    if args.otel_endpoint:
        kwargs["otel_endpoint"] = args.otel_endpoint
    logging.getLogger("p402.cli").info("p402 serve: starting (db %s, listen %s, core: %s)",
                                       _redact_url(args.db), args.listen, core.describe())
    kwargs["gc_tuning"] = True  # a process of P402's own (gc_policy.py)
    if args.workers > 1:
        from p402_server.workers import run_workers

        return run_workers(args.workers, args.db, args.listen, **kwargs)
    server.run(args.db, args.listen, **kwargs)
    return 0


def cmd_proxy(args: argparse.Namespace, out: Output) -> int:
    """`p402 proxy` (p402_server.gateways.proxy)."""
    _listen_check("--listen", args.listen)
    _gc_check()
    if not args.upstream.startswith(("http://", "https://")):
        raise UsageError("--upstream", f"{args.upstream!r} is not an http(s) URL")
    if args.upstream_timeout <= 0:
        raise UsageError("--upstream-timeout", "must be > 0 seconds")
    upstream_key = os.environ.get(args.upstream_key_env, "")
    target = None if args.db else (args.target or os.environ.get("P402_TARGET",
                                                                  DEFAULT_TARGET))
    if args.lease == "on" and not args.db:
        raise UsageError("--lease", "leases are held by the process that decides: use "
                         "it with --db (with --target the server holds them)")
    _configure_logs(args)
    from p402_server.gateways.proxy import ProxyConfig, serve_proxy

    if not upstream_key:  # a local upstream (vLLM, Ollama) may take none
        logging.getLogger("p402.cli").warning(
            "p402 proxy: $%s is empty; forwarding without an upstream key",
            args.upstream_key_env)
    config = ProxyConfig(upstream=args.upstream, upstream_key=upstream_key,
                         provider=args.provider, upstream_timeout=args.upstream_timeout)
    logging.getLogger("p402.cli").info(
        "p402 proxy: %s -> %s (P402 %s)", args.listen, config.upstream_base,
        f"embedded on {_redact_url(args.db)}" if args.db else target)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_proxy(config, args.listen, target=target, db=args.db,
                                leases=args.lease == "on", gc_tuning=True))
    else:
        uvloop.run(serve_proxy(config, args.listen, target=target, db=args.db,
                               leases=args.lease == "on", gc_tuning=True))
    return 0


async def _init_tenant(db: str, name: str, new_tenant: bool = False) -> tuple[str, str]:
    from p402_server.ledger import open_store
    from p402_server.server import init_tenant

    store = await open_store(db)
    try:
        existing = await store.list_tenants()
        if existing and not new_tenant:
            names = ", ".join(f"{t.name} ({t.tenant_id})" for t in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise UsageError("init", (
                f"{_redact_url(db)} already has {len(existing)} tenant(s): {names}{more}. "
                "A new tenant's key would see only its own, empty ledger. For another "
                "key of an existing tenant use `p402 keys create --scope admin` with "
                "its admin key; to create another tenant anyway, add --new-tenant."))
        return await init_tenant(store, name)
    finally:
        await store.close()


def cmd_init(args: argparse.Namespace, out: Output) -> int:
    if not args.name.strip():
        raise UsageError("--name", "must not be empty")
    tenant, api_key = _run_store(args.db, _init_tenant(args.db, args.name,
                                                       args.new_tenant))
    if args.json:
        out.json({"tenant": tenant, "api_key": api_key})
        return 0
    out.print(f"[bold]Tenant[/bold] {tenant} ({args.name}) created in {_redact_url(args.db)}")
    out.print(f"[bold]Admin API key[/bold] (shown once, store it now): {api_key}")
    out.print("\nNext:\n"
              f"  export P402_API_KEY={api_key}\n"
              f"  p402 serve --db {args.db}\n"
              "  p402 budgets set monthly --limit 100.00\n"
              "  p402 keys create --scope meter --name gateway", markup=False)
    return 0


def cmd_ping(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        pong = p402.ping()
    if args.json:
        out.json(pong.to_dict())
    else:
        out.print(f"ok: tenant {pong.tenant}, core {pong.implementation}, "
                  f"server {args.target}")
    return 0


def default_report_dir() -> Path:
    """Where `p402 bench` writes reports unless told: the user's data directory
    ($XDG_DATA_HOME/p402/bench-reports, else ~/.local/share/p402/bench-reports),
    never the source tree."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return Path(base) / "p402" / "bench-reports"


def _pretty_home(path: Path) -> str:
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if home and text.startswith(home + os.sep) else text


def _benchmarks_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    # An editable install or a checkout: benchmarks/ sits at the repository root.
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "benchmarks").is_dir() and (parent / "pyproject.toml").exists():
            return parent / "benchmarks"
    return Path.cwd() / "benchmarks"


def cmd_bench(args: argparse.Namespace, out: Output) -> int:
    # Checked before minutes of benchmarks, not after.
    out_dir = Path(args.report_dir) if args.report_dir else default_report_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError("--report-dir", f"{out_dir}: {exc.strerror}") from None
    root = _benchmarks_dir(args.dir)
    scripts = sorted(root.glob("bench_*.py"))
    if not scripts:
        raise UsageError("--dir", f"no benchmark scripts (bench_*.py) found in {root}")
    if args.only:
        scripts = [s for s in scripts if any(o in s.name for o in args.only)]
        if not scripts:
            raise UsageError("--only", f"no benchmark script in {root} matches "
                                       f"{', '.join(args.only)}")
    env = dict(os.environ)
    if args.quick:
        env["P402_BENCH_QUICK"] = "1"
    results = []
    for script in scripts:
        argv = [sys.executable, str(script)]
        # Pass --quick only to scripts that declare it; all of them see the env var.
        if args.quick and "--quick" in script.read_text(encoding="utf-8", errors="replace"):
            argv.append("--quick")
        out.print(f"[bold]── {script.name}[/bold] {' '.join(argv[2:])}")
        started = time.monotonic()
        # Streamed line by line (stderr merged): a long benchmark shows progress.
        proc = subprocess.Popen(argv, cwd=root.parent, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith("BENCH_JSON "):  # machine-readable, for the report
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
        elapsed = time.monotonic() - started
        results.append((script.name, proc.returncode, elapsed, lines))
    out.table("Benchmarks", ["script", "status", ("seconds", "right")],
              ([n, "ok" if rc == 0 else f"failed (exit {rc})", f"{s:.1f}"]
               for n, rc, s, _ in results))
    # The Markdown report and latency histogram (benchmarks/report.py).
    report_py = root / "report.py"
    if report_py.exists():
        import importlib.util

        spec = importlib.util.spec_from_file_location("p402_bench_report", report_py)
        report = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = report  # dataclasses resolve the module by name
        spec.loader.exec_module(report)
        path = report.write_report(
            [report.Result(n, rc, sec, lines) for n, rc, sec, lines in results],
            quick=args.quick, out_dir=out_dir)
        out.print(f"report: {path}", markup=False)
    return 0 if all(rc == 0 for _, rc, _, _ in results) else 1


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    listen = args.listen
    if listen is None:
        # A server that stays up gets the well-known address the other commands
        # default to; a one-shot tour takes any free port so it never collides.
        listen = (os.environ.get("P402_LISTEN", DEFAULT_LISTEN) if args.keep_running
                  else "127.0.0.1:0")
    _listen_check("--listen", listen)
    from p402_server.cli import demo

    if args.workflow and args.keep_running:
        raise UsageError("--keep-running", "is for the tour, not --workflow")
    if args.http:
        if args.workflow:
            raise UsageError("--http", "is for the tour, not --workflow")
        _listen_check("--http", args.http)
    return demo.run(db=args.db, listen=listen, keep_running=args.keep_running,
                    seed=args.seed, out=out, workflow=args.workflow, http=args.http)


def add_serve(sub) -> None:
    """`p402 serve` and its flags."""
    # serve
    p = sub.add_parser("serve", help="run the gRPC server", **_fmt(
        "Run the P402 gRPC server (MeterService, AdminService, health, reflection).",
        "p402 serve --db sqlite+aiosqlite:///p402.db --listen 127.0.0.1:4020"))
    p.add_argument("--db", default=os.environ.get("P402_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL (env P402_DB; default {DEFAULT_DB})")
    p.add_argument("--listen", default=os.environ.get("P402_LISTEN", DEFAULT_LISTEN),
                   help=f"HOST:PORT to listen on (env P402_LISTEN; default {DEFAULT_LISTEN})")
    p.add_argument("--max-concurrent-rpcs", type=int, default=None,
                   help="calls in flight before RESOURCE_EXHAUSTED (backpressure)")
    _log_flags(p)
    # -- dashboard (p402_server.dashboard) --
    p.add_argument("--http", default=os.environ.get("P402_HTTP") or None,
                   metavar="HOST:PORT",
                   help="also serve the ledger dashboard at http://HOST:PORT/dashboard/ "
                        "(env P402_HTTP; off by default)")
    p.add_argument("--http-secure-cookies", action="store_true",
                   default=os.environ.get("P402_HTTP_SECURE_COOKIES", "") in ("1", "true"),
                   help="mark dashboard cookies Secure even over plain http (use behind "
                        "a TLS-terminating proxy; env P402_HTTP_SECURE_COOKIES=1)")
    # -- Envoy ext_authz (p402_server.gateways.envoy) --
    p.add_argument("--ext-authz", action="store_true",
                   help="also serve Envoy's envoy.service.auth.v3.Authorization/Check on "
                        "the same port (needs the `envoy` extra: xds-protos)")
    p.add_argument("--ext-authz-provider", default="",
                   help="provider for price lookup when the route names none")
    p.add_argument("--ext-authz-strip-authorization", action="store_true",
                   help="remove the caller's authorization header before the upstream")
    # -- scale-out (p402_server.runtime.leases, p402_server.workers) --
    p.add_argument("--otel-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
                   metavar="URL",
                   help="send a span per Authorize/Record and the decision and latency "
                        "metrics to this OTLP/HTTP collector (pip install -e '.[otel]'; "
                        "env OTEL_EXPORTER_OTLP_ENDPOINT); default off")
    p.add_argument("--no-metrics", action="store_true",
                   help="do not count decisions, latencies and the writer's work "
                        "(metrics are served at /metrics on the --http port)")
    p.add_argument("--lease", choices=("on", "off"),
                   default=os.environ.get("P402_LEASE") or None,
                   help="lease HARD budgets from the store in slices (needed when several "
                        "processes or replicas share one ledger; env P402_LEASE; default "
                        "off, on with --workers > 1)")
    p.add_argument("--workers", type=int,
                   default=int(os.environ.get("P402_WORKERS") or 1),
                   help="worker processes sharing the port with SO_REUSEPORT, each with "
                        "its own leases (env P402_WORKERS; default 1)")
    p.set_defaults(func=cmd_serve)


def add_proxy(sub) -> None:
    """`p402 proxy` and its flags."""
    # proxy (p402_server.gateways.proxy)
    p = sub.add_parser("proxy", help="an OpenAI-compatible endpoint that meters every call",
                       **_fmt("Serve the OpenAI API (/v1/chat/completions, /v1/responses, "
                              "/v1/embeddings, /v1/models) in front of an upstream: callers "
                              "authenticate with a P402 meter key, owners come from "
                              "x-p402-* headers, every call is authorized and recorded.",
                              "OPENAI_API_KEY=sk-… p402 proxy --upstream "
                              "https://api.openai.com/v1 --listen 127.0.0.1:8402 "
                              "--target 127.0.0.1:4020"))
    p.add_argument("--upstream", required=True, metavar="URL",
                   help="the OpenAI-compatible base URL to forward to (…/v1)")
    p.add_argument("--listen", default=os.environ.get("P402_PROXY_LISTEN", "127.0.0.1:8402"),
                   help="HOST:PORT to listen on (env P402_PROXY_LISTEN; default "
                        "127.0.0.1:8402)")
    p.add_argument("--upstream-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the upstream's API key (default "
                        "OPENAI_API_KEY); callers' keys are never forwarded")
    p.add_argument("--provider", default="openai",
                   help="provider name for price lookup (default openai)")
    p.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds for a whole upstream answer (default 600)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target", default=None,
                   help="a running P402 server HOST:PORT (env P402_TARGET; default "
                        f"{DEFAULT_TARGET})")
    g.add_argument("--db", default=None,
                   help="embedded: P402's runtime and ledger writer in this process on "
                        "this ledger, called directly (no gRPC hop)")
    p.add_argument("--lease", choices=("on", "off"),
                   default=os.environ.get("P402_LEASE") or "off",
                   help="with --db: lease HARD budgets from the store in slices, so this "
                        "proxy shares budgets with other proxies and servers on the same "
                        "PostgreSQL ledger (env P402_LEASE; default off)")
    _log_flags(p)
    p.set_defaults(func=cmd_proxy)


def add_init(sub) -> None:
    """`p402 init` and its flags."""
    # init
    p = sub.add_parser("init", help="create a tenant and its first admin key", **_fmt(
        "Create a tenant and its first admin key. The key is printed once; only its "
        "hash is stored.", "p402 init --db sqlite+aiosqlite:///p402.db --name acme-corp"))
    p.add_argument("--db", default=os.environ.get("P402_DB", DEFAULT_DB),
                   help=f"SQLAlchemy URL (env P402_DB; default {DEFAULT_DB})")
    p.add_argument("--name", default="default", help="tenant name (default 'default')")
    p.add_argument("--new-tenant", action="store_true",
                   help="create another tenant in a database that already has one (its "
                        "key sees only the new tenant's ledger); without it, init on a "
                        "database with a tenant exits 2")
    _json_flag(p)
    p.set_defaults(func=cmd_init)


def add_ping(sub) -> None:
    """`p402 ping` and its flags."""
    # ping
    p = sub.add_parser("ping", help="check the server and the key", **_fmt(
        "Authenticated no-op: prints the key's tenant and the server's core.",
        "p402 ping --target 127.0.0.1:4020"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_ping)


def add_bench(sub) -> None:
    """`p402 bench` and its flags."""
    # bench
    p = sub.add_parser("bench", help="run the benchmarks", **_fmt(
        "Run each benchmarks/bench_*.py script in its own process and report its "
        "output.", "p402 bench --quick"))
    p.add_argument("--quick", action="store_true", help="short runs (P402_BENCH_QUICK=1)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="only scripts whose name contains NAME (repeatable)")
    p.add_argument("--dir", default=None, help="benchmarks directory")
    p.add_argument("--report-dir", default=os.environ.get("P402_BENCH_REPORTS") or None,
                   metavar="DIR",
                   help="where the Markdown report and latency SVG go (env "
                        "P402_BENCH_REPORTS; default "
                        f"{_pretty_home(default_report_dir())}, outside the source tree)")
    p.set_defaults(func=cmd_bench)


def add_demo(sub) -> None:
    """`p402 demo` and its flags."""
    # demo
    p = sub.add_parser("demo", help="a self-contained tour on a temporary database",
                       **_fmt("Start a server on a temporary SQLite file, create a "
                              "tenant, budgets and policies, send a realistic mix of "
                              "calls through the Python client, and print the ledger "
                              "and the spend.", "p402 demo --keep-running"))
    p.add_argument("--db", default=None,
                   help="SQLAlchemy URL (default: a temporary SQLite file)")
    p.add_argument("--listen", default=None,
                   help="HOST:PORT (default: a free port on 127.0.0.1; with "
                        f"--keep-running, P402_LISTEN or {DEFAULT_LISTEN})")
    p.add_argument("--keep-running", action="store_true",
                   help="keep serving after the tour, until Ctrl-C")
    p.add_argument("--http", default=os.environ.get("P402_HTTP") or None,
                   metavar="HOST:PORT",
                   help="also serve the ledger dashboard at http://HOST:PORT/dashboard/ "
                        "and print its URL and a read key (env P402_HTTP; with "
                        "--keep-running it stays up)")
    p.add_argument("--seed", type=int, default=402, help="random seed (default 402)")
    p.add_argument("--workflow", default=None,
                   choices=("support", "code-review", "extraction", "finance", "all"),
                   help="run a vertical workflow (p402_server.cli.demo_workflows) instead "
                        "of the tour")
    p.set_defaults(func=cmd_demo)

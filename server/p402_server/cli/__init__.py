"""The `p402` command line: run the server, bootstrap a tenant, administer and read it.

Owns argument parsing, the exit-code contract and the human / machine output of
every command. Server work is delegated: `serve` to `p402_server.server.serve`,
`init` to the store and `server.init_tenant`, `demo` to `p402_server.cli.demo`; every
remote command goes through the Python SDK (`p402_client.P402Client`), so the CLI
sees exactly what any gateway sees.

Exit codes: 0 success; 2 bad input — a one-line message naming the flag or field
(argparse errors included); 1 server or runtime errors, with the gRPC status and
message; 130 on Ctrl-C. Every read command takes `--json` (machine-readable: money
as exact ints of nano-USD plus exact USD strings). Money flags are USD decimal
strings, parsed with Decimal to nano-USD exactly (more than 9 decimals is an error).

The package, one module per idea:

- `main`     the entry point and the exit-code contract;
- `parser`   the top-level parser and the order of its commands;
- `common`   what commands share: defaults, flag vocabularies, parsing flag values
             into UsageError, the way to a server (SDK client) or a database;
- `output`   what is shown: tables that fit the terminal, JSON, money and time as
             text, event rows and spend tables (the demo prints with them too);
- `serving`  serve, proxy, init, ping, bench, demo;
- `admin`    keys, budgets, policies, prices, settings, pricebook;
- `ledger`   events, spend, export, verify, contents, receipts, statements, billing.

Each command module declares its commands' flags (`add_<command>(sub)`) next to the
code that runs them (`cmd_<command>[_<action>]`).
"""
from __future__ import annotations

from p402_server.cli.common import UsageError, parse_time, parse_usd
from p402_server.cli.main import main
from p402_server.cli.output import Output, usd
from p402_server.cli.parser import build_parser

__all__ = ["main", "build_parser", "Output", "UsageError", "parse_time", "parse_usd", "usd"]

"""The `p402` argument parser: the top-level parser and its commands in the order
`p402 --help` lists them; each command's flags are declared by the module that runs it
(`add_<command>(sub)`)."""
from __future__ import annotations

import argparse

from p402_server.cli import admin, ledger, serving
from p402_server.cli.common import _fmt, _Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p402",
        **_fmt("P402: meter every AI call as an economic event — authorize, record, "
               "query.", "p402 demo"))
    parser.add_argument("--version", action="version", version="p402 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    serving.add_serve(sub)
    serving.add_proxy(sub)
    serving.add_init(sub)
    serving.add_ping(sub)
    admin.add_keys(sub)
    ledger.add_receipts(sub)
    ledger.add_statements(sub)
    ledger.add_billing(sub)
    admin.add_pricebook(sub)
    admin.add_budgets(sub)
    admin.add_policies(sub)
    admin.add_prices(sub)
    ledger.add_events(sub)
    ledger.add_spend(sub)
    ledger.add_export(sub)
    ledger.add_verify(sub)
    ledger.add_contents(sub)
    admin.add_settings(sub)
    serving.add_bench(sub)
    serving.add_demo(sub)
    return parser

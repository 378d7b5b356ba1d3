"""The entry point (`p402`): parse, run the command, and keep the exit-code contract
(0 success; 2 bad input naming the flag or field; 1 server or runtime errors; 130 on
Ctrl-C)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from p402_server.cli.common import UsageError
from p402_server.cli.output import Output
from p402_server.cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the `p402` script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return exc.code if isinstance(exc.code, int) else 2
    out = Output()
    func: Callable[[argparse.Namespace, Output], int] = args.func
    try:
        return func(args, out)
    except UsageError as exc:
        _fail(f"{exc.flag}: {exc.message}")
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the exit-code contract needs them all
        return _runtime_error(exc)


def _runtime_error(exc: Exception) -> int:
    from p402_client import InvalidArgument, P402Error

    if isinstance(exc, InvalidArgument):
        # The server (or the client) rejected a value: still bad input, field named.
        _fail(f"{exc.field or 'argument'}: {exc.message}")
        return 2
    if isinstance(exc, P402Error):
        code = exc.code.name if exc.code is not None else "ERROR"
        _fail(f"{code}: {exc.message}")
        return 1
    try:
        from p402core import CoreNotBuilt
        from p402core import InvalidArgument as CoreInvalid
    except ImportError:  # pragma: no cover
        CoreInvalid = CoreNotBuilt = ()  # type: ignore[assignment]
    if isinstance(exc, CoreInvalid):
        _fail(f"{exc.field}: {exc.message}")
        return 2
    if isinstance(exc, CoreNotBuilt):
        _fail(str(exc))
        return 1
    from p402_server.listen import ListenError

    if isinstance(exc, ListenError):
        _fail(exc.strerror or str(exc))
        return 1
    _fail(f"{type(exc).__name__}: {exc}")
    if os.environ.get("P402_DEBUG"):
        raise exc
    return 1


def _fail(message: str) -> None:
    sys.stderr.write(f"p402: error: {message}\n")
    sys.stderr.flush()

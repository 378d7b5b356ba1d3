"""Every test leaves the root logger as it found it.

`p402 serve` and `p402 proxy`, run in process by some tests (`cli.main`), configure
logging (p402_server.observe.logs.configure: the root's level, and a handler on the
stderr of that moment, which pytest closes after the test). Left behind, a later
test's log line goes to a closed stream ("--- Logging error ---" in the run's
output) or at a level that test did not ask for.
"""
from __future__ import annotations

import logging

import pytest


def _ours(handler: logging.Handler) -> bool:
    return not type(handler).__module__.startswith("_pytest")  # pytest's are its own


@pytest.fixture(autouse=True)
def _root_logger_restored():
    root = logging.getLogger()
    level, handlers = root.level, [h for h in root.handlers if _ours(h)]
    yield
    for h in root.handlers[:]:
        if _ours(h) and h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)

"""Every core test runs twice: against the compiled core and its pure-Python twin."""
from __future__ import annotations

import pytest

import p402core
from p402core import _impl

KINDS = ["python"] if _impl.NO_EXTENSIONS else ["python", "compiled"]


@pytest.fixture(params=KINDS, scope="session")
def impl(request):
    """The implementation under test: `impl.Catalog`, `impl.Engine`, … of one twin."""
    return p402core.load(request.param)


@pytest.fixture(scope="session")
def both():
    """(python, compiled) pair for differential tests; skipped without extensions."""
    if _impl.NO_EXTENSIONS:
        pytest.skip("P402_NO_EXTENSIONS=1: the compiled core is not under test")
    return p402core.load("python"), p402core.load("compiled")

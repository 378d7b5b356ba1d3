"""Fixtures of the client tests: one real server per session (a tmp SQLite ledger),
a fresh tenant per test so tests never see each other's ledger."""
from __future__ import annotations

import pytest

from tests.client.serverthread import ServerThread


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("p402-client") / "ledger.db"
    st = ServerThread(f"sqlite+aiosqlite:///{db}").start()
    yield st
    st.stop()


@pytest.fixture
def tenant(server):
    """(tenant_id, admin api key) of a new tenant on the shared server."""
    return server.new_tenant("client-test")


@pytest.fixture
def p402(server, tenant):
    from p402_client import P402Client

    with P402Client(server.target, api_key=tenant[1], timeout=10.0) as client:
        yield client

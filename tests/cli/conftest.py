"""Fixtures of the CLI tests: one real server per session (a tmp SQLite ledger), a
fresh tenant per test, and the environment the remote commands read."""
from __future__ import annotations

import pytest

from tests.client.serverthread import ServerThread


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("p402-cli") / "ledger.db"
    st = ServerThread(f"sqlite+aiosqlite:///{db}").start()
    yield st
    st.stop()


@pytest.fixture
def tenant(server, monkeypatch):
    """A new tenant; P402_TARGET / P402_API_KEY point the CLI at it."""
    tenant_id, api_key = server.new_tenant("cli-test")
    monkeypatch.setenv("P402_TARGET", server.target)
    monkeypatch.setenv("P402_API_KEY", api_key)
    return tenant_id, api_key

"""P402_SECRET_KEY at start (signing.warn_if_unsealed): `serve` (what `p402 serve`
runs) logs one warning when tenant secrets will be stored unsealed, none when the
key is set, and refuses a malformed key before serving; sealing a secret never
logs (embedded servers such as `p402 demo` stay quiet)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from p402_server.privacy import signing
from p402_server.server import serve

WARNING = "P402_SECRET_KEY is not set"


@pytest.fixture(autouse=True)
def fresh_warning_state(monkeypatch):
    # The warning is once per process: every test starts from "not warned yet".
    monkeypatch.setattr(signing, "_warned", False)


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "p402.server.signing" and WARNING in r.getMessage()]


async def _serve_once(tmp_path, name: str) -> None:
    """serve() until it is ready, then stop it; a tenant's secrets get sealed in
    between (a gateway registered over gRPC), which must not warn again."""
    from p402_client import AsyncP402Client
    from p402_server.server import init_tenant
    from p402_server.ledger import open_store

    url = f"sqlite+aiosqlite:///{tmp_path}/{name}.db"
    store = await open_store(url)
    _tid, key = await init_tenant(store, name)
    await store.close()
    stop = asyncio.Event()
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(serve(url, "127.0.0.1:0", stop_event=stop,
                                       ready=ready.set_result))
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 30)
        async with AsyncP402Client(f"127.0.0.1:{port}", api_key=key) as p402:
            reg = await p402.register_gateway(name="edge")  # seals a secret
            assert reg.secret
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_serve_warns_once_without_a_key(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("P402_SECRET_KEY", raising=False)
    caplog.set_level(logging.WARNING, logger="p402")
    await _serve_once(tmp_path, "a")
    assert len(_warnings(caplog)) == 1
    await _serve_once(tmp_path, "b")  # once per process, not per start
    assert len(_warnings(caplog)) == 1


async def test_serve_is_quiet_with_a_key(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("P402_SECRET_KEY", "11" * 32)
    caplog.set_level(logging.WARNING, logger="p402")
    await _serve_once(tmp_path, "c")
    assert _warnings(caplog) == []


async def test_a_malformed_key_fails_the_start(tmp_path, monkeypatch):
    monkeypatch.setenv("P402_SECRET_KEY", "not-hex")
    with pytest.raises(ValueError, match="P402_SECRET_KEY"):
        await serve(f"sqlite+aiosqlite:///{tmp_path}/d.db", "127.0.0.1:0",
                    stop_event=asyncio.Event())


def test_sealing_never_logs(monkeypatch, caplog):
    monkeypatch.delenv("P402_SECRET_KEY", raising=False)
    caplog.set_level(logging.DEBUG, logger="p402")
    stored = signing.seal(b"s" * 32)
    assert signing.unseal(stored) == b"s" * 32
    assert caplog.records == []

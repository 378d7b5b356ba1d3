"""The proofs' process harness: a child whose port was taken between free_port() and
its bind is started again on another port, so a proof fails for what it proves and
not for a race of the harness."""
from __future__ import annotations

import socket

import pytest

from tests.proof import harness
from tests.proof.harness import ServerProcess, sqlite_url
from tests.support import proxy_process as pp


@pytest.fixture
def taken_port(monkeypatch):
    """A listening port that free_port() hands out first (the race, made certain)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    taken = sock.getsockname()[1]
    handed: list[int] = []
    real = harness.free_port

    def free_port():
        port = taken if not handed else real()
        handed.append(port)
        return port

    monkeypatch.setattr(harness, "free_port", free_port)
    monkeypatch.setattr(pp, "free_port", free_port)
    yield taken, handed
    sock.close()


def test_a_server_whose_port_was_taken_starts_on_another(tmp_path, taken_port):
    taken, handed = taken_port
    log = tmp_path / "serve.log"
    srv = ServerProcess(sqlite_url(tmp_path / "ledger.db"), log_path=log).start()
    try:
        assert handed[0] == taken and len(handed) == 2
        assert srv.port == handed[1] != taken and srv.alive()
        assert f"port {taken} is already in use" in log.read_text()
    finally:
        srv.stop()


def test_a_server_that_fails_for_another_reason_is_not_retried(tmp_path, taken_port):
    _taken, handed = taken_port
    srv = ServerProcess("not-a-database-url", log_path=tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited with 2"):
        srv.start()
    assert len(handed) == 1


def test_a_proxy_whose_port_was_taken_starts_on_another(tmp_path, taken_port):
    taken, handed = taken_port
    log = tmp_path / "proxy.log"
    proc, port = pp.proxy_process(("--db", sqlite_url(tmp_path / "ledger.db")),
                                  "http://127.0.0.1:9", log)
    try:
        assert handed[0] == taken and port == handed[1] != taken
        assert proc.poll() is None
        assert f"port {taken} is already in use" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)

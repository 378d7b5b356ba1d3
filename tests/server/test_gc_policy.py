"""A serving process's garbage-collector settings (gc_policy.py) and P402_GC."""
from __future__ import annotations

import gc

import pytest

from p402_server.cli.main import main
from p402_server.gc_policy import THRESHOLDS, thresholds_from_env, tune_gc


def test_p402_gc_values():
    assert thresholds_from_env(None) == THRESHOLDS
    assert thresholds_from_env("") == THRESHOLDS
    assert thresholds_from_env("default") is None
    assert thresholds_from_env(" Default ") is None
    assert thresholds_from_env("1000,10,10") == (1000, 10, 10)
    for bad in ("700", "1,2", "a,b,c", "0,10,10", "-1,10,10", "1,2,3,4", "1.5,2,3"):
        with pytest.raises(ValueError, match="P402_GC"):
            thresholds_from_env(bad)


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_sets_thresholds_and_freezes_start_up(monkeypatch, restore_gc):
    monkeypatch.delenv("P402_GC", raising=False)
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    assert tune_gc() == THRESHOLDS
    assert gc.get_threshold() == THRESHOLDS and gc.get_freeze_count() > 0
    gc.unfreeze()
    monkeypatch.setenv("P402_GC", "default")
    gc.set_threshold(700, 10, 10)
    assert tune_gc() == (700, 10, 10) and gc.get_freeze_count() == 0


@pytest.mark.parametrize("command", [["serve"], ["proxy", "--upstream", "http://127.0.0.1:9"]])
def test_a_bad_p402_gc_is_refused_before_serving(command, monkeypatch, capsys):
    monkeypatch.setenv("P402_GC", "lots")
    assert main([*command, "--listen", "127.0.0.1:0", "--db",
                 "sqlite+aiosqlite:///:memory:"]) == 2
    err = capsys.readouterr().err
    assert "P402_GC" in err and "three positive integers" in err

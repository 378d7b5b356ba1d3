"""setup.py as a new user meets it: it says what it builds and for how long, and a
machine without a C compiler (or without the Python headers) gets a message naming
what is missing and the way out (P402_NO_EXTENSIONS=1), not a raw gcc error."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("p402_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines, builds nothing
    return mod


def test_no_compiler_names_it_and_the_way_out(setup_py):
    msg = setup_py.missing_build_tools(["p402-no-such-cc", "-pthread"])
    assert "no C compiler" in msg and "'p402-no-such-cc'" in msg
    assert "P402_NO_EXTENSIONS=1 pip install -e ." in msg


def test_missing_python_headers_are_named(setup_py, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or sys.executable  # any executable
    msg = setup_py.missing_build_tools([cc], include_dir=str(tmp_path))
    assert "Python headers are missing" in msg and "Python.h" in msg
    assert "P402_NO_EXTENSIONS=1" in msg


@pytest.mark.skipif(not shutil.which("gcc") or not os.path.exists(
    os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    reason="needs gcc and the Python headers")
def test_a_machine_with_the_tools_passes(setup_py):
    assert setup_py.missing_build_tools(["gcc"]) is None


def test_the_build_says_what_it_compiles_before_and_per_module(setup_py, monkeypatch,
                                                                capsys):
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    built = []
    monkeypatch.setattr(build_ext, "build_extension", lambda self, ext: built.append(ext.name))
    dist = Distribution({"ext_modules": [Extension("p402core._a_c", ["a.c"]),
                                         Extension("p402core._b_c", ["b.c"])]})
    cmd = setup_py.BuildExt(dist)
    cmd.ensure_finalized()
    cmd.compiler = SimpleNamespace(compiler_so=[shutil.which("gcc") or sys.executable])
    monkeypatch.setattr(setup_py, "missing_build_tools", lambda *a, **k: None)
    cmd.build_extensions()
    lines = capsys.readouterr().out.splitlines()
    assert "about a minute" in lines[0] and "P402_NO_EXTENSIONS=1" in lines[0]
    assert lines[1:] == ["p402: [1/2] compiling p402core._a_c",
                         "p402: [2/2] compiling p402core._b_c"]
    assert built == ["p402core._a_c", "p402core._b_c"]


def test_build_without_a_compiler_fails_with_the_message(setup_py, monkeypatch, tmp_path):
    """The real build_ext path: the compiler distutils configures from $CC is checked
    before anything is compiled, and the failure is one clear message."""
    from setuptools import Distribution, Extension

    monkeypatch.setenv("CC", "p402-no-such-cc")
    dist = Distribution({"ext_modules": [Extension("p402core._a_c", ["a.c"])]})
    cmd = setup_py.BuildExt(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    with pytest.raises(SystemExit) as exc:
        cmd.run()
    msg = str(exc.value)
    assert msg.startswith("p402: no C compiler: 'p402-no-such-cc' is not on PATH")
    assert "P402_NO_EXTENSIONS=1 pip install -e ." in msg
    assert not (tmp_path / "lib").exists()

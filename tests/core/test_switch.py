"""The one switch: compiled twins by default, pure-Python twins on request."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import p402core
from p402core import _impl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# each public name of ours and the module that must define it
NAMES = {
    "Engine": "engine", "Authorization": "engine", "Settlement": "engine",
    "Budget": "budget", "BudgetBook": "budget", "BudgetStatus": "budget",
    "Catalog": "prices", "ModelPrice": "prices", "Estimator": "estimate",
    "RuleSet": "policy", "PolicyResult": "policy", "Fingerprinter": "fingerprint",
}


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="P402_NO_EXTENSIONS=1: twins forced")
def test_compiled_core_is_what_p402core_resolves():
    assert p402core.IMPLEMENTATION == "compiled"
    assert p402core.Engine.__module__ == "p402core._engine_c"
    for name, module in NAMES.items():
        obj = getattr(p402core, name)
        assert obj.__module__ == f"p402core._{module}_c", name
        assert obj is getattr(p402core.load("compiled"), name)
    # really extension modules, not a .py that happens to carry the name
    for module in set(NAMES.values()):
        mod = p402core.load("compiled").module(module)
        assert mod.__file__.endswith((".so", ".pyd")), mod.__file__


def test_each_twin_exports_the_same_names():
    py = p402core.load("python")
    for module in _impl.MODULES:
        names = set(py.module(module).__all__)
        if not _impl.NO_EXTENSIONS:
            assert set(p402core.load("compiled").module(module).__all__) == names, module


def test_no_extensions_env_gives_the_python_twins():
    code = (
        "import json, p402core\n"
        "print(json.dumps({'impl': p402core.IMPLEMENTATION,"
        " 'mods': {n: getattr(p402core, n).__module__ for n in %r}}))" % list(NAMES)
    )
    env = dict(os.environ, P402_NO_EXTENSIONS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out)
    assert got["impl"] == "python"
    assert got["mods"] == {n: f"p402core._{m}_py" for n, m in NAMES.items()}

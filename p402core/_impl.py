"""The one switch between the compiled core and its pure-Python twin.

`P402_NO_EXTENSIONS=1` (read once, here) forces the twins; non-CPython always
gets them. Otherwise the compiled modules must import: a missing build is an
error (`CoreNotBuilt`, with the way out), never a silent fall-back to the slow
path. Modules load lazily; a server calls `check()` at start so a missing build
fails there, not at the first call.
"""
from __future__ import annotations

import importlib
import os
import platform

# Each name is a pair of modules: p402core._<name>_c (Cython) and _<name>_py.
MODULES = ("prices", "estimate", "budget", "policy", "fingerprint", "engine", "ledger",
           "stream")

NO_EXTENSIONS = bool(os.environ.get("P402_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)
IMPLEMENTATION = "python" if NO_EXTENSIONS else "compiled"


class CoreNotBuilt(ImportError):
    """The compiled core was asked for but a compiled module is not there."""


def _import(name: str, kind: str):
    suffix = "_c" if kind == "compiled" else "_py"
    try:
        return importlib.import_module(f"p402core._{name}{suffix}")
    except ImportError as exc:
        if kind == "compiled" and f"_{name}_c" in str(exc):
            raise CoreNotBuilt(
                f"the compiled core is not built: p402core._{name}_c is missing (was "
                "it installed with P402_NO_EXTENSIONS=1, or did the build fail?). Set "
                "P402_NO_EXTENSIONS=1 to run the pure-Python twins on purpose, or "
                "rebuild it with `pip install -e .`."
            ) from exc
        raise


class Implementation:
    """Every public name of one implementation ("compiled" or "python").

    Modules import lazily, on the first name looked up in them, so a test of
    one module needs only that module (and what it imports) built.
    """

    def __init__(self, kind: str):
        if kind not in ("compiled", "python"):
            raise ValueError(f"kind must be 'compiled' or 'python', not {kind!r}")
        self.IMPLEMENTATION = kind
        self._modules: dict = {}

    def module(self, name: str):
        mod = self._modules.get(name)
        if mod is None:
            mod = self._modules[name] = _import(name, self.IMPLEMENTATION)
        return mod

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        for name in MODULES:
            mod = self.module(name)
            if attr in mod.__all__:
                value = getattr(mod, attr)
                setattr(self, attr, value)
                return value
        raise AttributeError(f"p402core ({self.IMPLEMENTATION}) has no {attr!r}")

    def check(self) -> "Implementation":
        """Import every module now (a missing compiled module raises CoreNotBuilt)."""
        for name in MODULES:
            self.module(name)
        return self

    def describe(self) -> str:
        """What really runs, for logs: "compiled (8 Cython modules)" or "pure-Python
        (P402_NO_EXTENSIONS=1)" — after `check()`, a fact, not an intention."""
        if self.IMPLEMENTATION == "compiled":
            return f"compiled ({len(MODULES)} Cython modules)"
        why = ("P402_NO_EXTENSIONS=1" if os.environ.get("P402_NO_EXTENSIONS")
               else platform.python_implementation())
        return f"pure-Python twins ({why})"

    def names(self) -> dict:
        out = {}
        for name in MODULES:
            mod = self.module(name)
            out.update({attr: getattr(mod, attr) for attr in mod.__all__})
        return out


_loaded: dict = {}


def load(kind: str) -> Implementation:
    impl = _loaded.get(kind)
    if impl is None:
        impl = _loaded[kind] = Implementation(kind)
    return impl

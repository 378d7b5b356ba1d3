"""Build step: generate the gRPC stubs from proto/ and compile the Cython core.

`pip install -e .` (or `pip install .`) runs this. The compiled core is the
default and takes about a minute to build; it says so before it starts and prints
a line per module (pip shows them with `-v`). A missing C compiler or missing
Python headers fail the build with a message naming what is missing and the way
out; any other compiler failure fails the build loudly. `P402_NO_EXTENSIONS=1`
skips the extensions on purpose (the pure-Python twins then run).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(ROOT, "proto")
STUB_ROOT = os.path.join(ROOT, "clients", "python")  # stubs land in clients/python/p402/v1

PACKAGE_DIRS = {
    "p402core": "p402core",
    "p402_server": "server/p402_server",
    "p402_client": "clients/python/p402_client",
    "p402": "clients/python/p402",
}


def generate_stubs() -> None:
    """protoc proto/p402/v1/*.proto -> clients/python/p402/v1/*_pb2{,_grpc}.py(i)."""
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "p402", "v1", "*.proto")))
    if not protos:
        return
    os.makedirs(os.path.join(STUB_ROOT, "p402", "v1"), exist_ok=True)
    wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    googleapis = os.path.dirname(os.path.dirname(os.path.dirname(
        importlib.util.find_spec("google.type.money_pb2").origin)))
    args = [
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{wkt}", f"-I{googleapis}",
        f"--python_out={STUB_ROOT}", f"--pyi_out={STUB_ROOT}",
        f"--grpc_python_out={STUB_ROOT}", *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("p402: protoc failed to generate the gRPC stubs from proto/")
    for pkg in ("p402", os.path.join("p402", "v1")):
        init = os.path.join(STUB_ROOT, pkg, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as fh:
                fh.write('"""Generated from proto/ at build time; do not edit."""\n')
    # The API reference from the protos' comments (reflection carries none).
    spec = importlib.util.spec_from_file_location(
        "p402_apiref", os.path.join(ROOT, "server", "p402_server", "api", "apiref.py"))
    apiref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apiref)
    with open(os.path.join(STUB_ROOT, "p402", "v1", "API.md"), "w", encoding="utf-8") as fh:
        fh.write(apiref.render(apiref.descriptor_set(PROTO_DIR)))


def packages() -> list[str]:
    found = []
    for pkg, where in PACKAGE_DIRS.items():
        base = os.path.join(ROOT, where)
        if not os.path.isdir(base):
            continue
        for dirpath, _dirs, files in os.walk(base):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, base)
                found.append(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    return sorted(found)


WAY_OUT = ("Or install the pure-Python core on purpose: `P402_NO_EXTENSIONS=1 pip "
           "install -e .` (and run P402 with P402_NO_EXTENSIONS=1 too).")
NO_COMPILER_HINT = ("Install a C compiler and the Python headers (Debian/Ubuntu: `apt-get install gcc python3-dev`; "
                    "Fedora: `dnf install gcc python3-devel`; macOS: `xcode-select "
                    "--install`). " + WAY_OUT)


def missing_build_tools(compiler_cmd: list[str] | None = None,
                        include_dir: str | None = None) -> str | None:
    """Why the Cython core cannot be compiled here (no C compiler, no Python.h), or
    None. `compiler_cmd` is the compiler command distutils will run (default: $CC,
    else the interpreter's configured CC)."""
    if compiler_cmd is None:
        cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
        compiler_cmd = shlex.split(cc)
    exe = compiler_cmd[0] if compiler_cmd else ""
    if not exe or shutil.which(exe) is None:
        return (f"p402: no C compiler: {exe or '(none)'!r} is not on PATH, and the "
                f"compiled core (p402core, Cython) needs one. {NO_COMPILER_HINT}")
    include_dir = include_dir or sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include_dir, "Python.h")):
        return (f"p402: the Python headers are missing ({include_dir}/Python.h), and "
                f"the compiled core (p402core, Cython) needs them. {NO_COMPILER_HINT}")
    return None


class BuildExt(build_ext):
    """build_ext that checks the tools first and says what it compiles."""

    def build_extensions(self) -> None:
        problem = missing_build_tools(list(self.compiler.compiler_so or []) or None)
        if problem:
            raise SystemExit(problem)
        print(f"p402: compiling the core: {len(self.extensions)} Cython modules, about "
              "a minute (P402_NO_EXTENSIONS=1 skips this and uses the pure-Python twins)",
              flush=True)
        super().build_extensions()

    def build_extension(self, ext) -> None:
        index = self.extensions.index(ext) + 1
        print(f"p402: [{index}/{len(self.extensions)}] compiling {ext.name}", flush=True)
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError: say which and the way out
            raise SystemExit(f"p402: compiling {ext.name} failed ({exc}); the "
                             f"compiler's error is above. {WAY_OUT}") from exc


def extensions() -> list:
    if os.environ.get("P402_NO_EXTENSIONS"):
        print("p402: P402_NO_EXTENSIONS is set: building the pure-Python twins only")
        return []
    from Cython.Build import cythonize

    sources = sorted(glob.glob(os.path.join("p402core", "_*_c.pyx")))
    exts = [
        Extension(
            "p402core." + os.path.splitext(os.path.basename(src))[0],
            [src],
            extra_compile_args=["-O3"],
        )
        for src in sources
    ]
    print(f"p402: translating {len(exts)} Cython modules of p402core to C, then "
          "compiling them: about a minute", flush=True)
    return cythonize(
        exts,
        # Per-file directives live in each .pyx header (STYLE.md).
        compiler_directives={"language_level": "3"},
        quiet=True,
    )


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    generate_stubs()
    setup(
        packages=packages(),
        package_dir={pkg: where for pkg, where in PACKAGE_DIRS.items()
                     if os.path.isdir(os.path.join(ROOT, where))},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExt},
        zip_safe=False,
    )

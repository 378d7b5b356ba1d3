"""Build step: generate the gRPC stubs from proto/ and compile the Cython core.

`pip install -e .` (or `pip install .`) runs this. The compiled core is the
default; a compiler failure fails the build loudly. `P402_NO_EXTENSIONS=1`
skips the extensions on purpose (the pure-Python twins then run).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import Extension, setup

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
    print(f"p402: compiling {len(exts)} Cython modules of p402core")
    return cythonize(
        exts,
        # Per-file directives live in each .pyx header (STYLE.md).
        compiler_directives={"language_level": "3"},
        quiet=True,
    )


generate_stubs()
setup(
    packages=packages(),
    package_dir={pkg: where for pkg, where in PACKAGE_DIRS.items()
                 if os.path.isdir(os.path.join(ROOT, where))},
    ext_modules=extensions(),
    zip_safe=False,
)

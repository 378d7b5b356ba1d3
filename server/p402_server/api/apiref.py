"""The API reference of the wire contract, generated from the comments in proto/.

gRPC server reflection carries no comments, so a field's meaning, unit and default
cannot be read from a running server. This renders them: protoc compiles proto/ with
`--include_source_info` into a FileDescriptorSet, whose SourceCodeInfo keeps every
comment by the path of what it documents; `render` turns that into one Markdown page
(services and their RPCs, then every message with a table of its fields, then the
enums). `setup.py` writes it next to the generated stubs at build time
(clients/python/p402/v1/API.md); `python -m p402_server.api.apiref [OUT]` writes it
anywhere. Plain imports only: setup.py loads this file by path, before P402 is built.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
import tempfile

# FileDescriptorProto field numbers (descriptor.proto): the paths SourceCodeInfo uses.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_VALUE, _METHOD = 2, 2
_TYPES = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 8: "bool",
          9: "string", 12: "bytes", 13: "uint32", 17: "sint32", 18: "sint64"}


def descriptor_set(proto_dir: str) -> bytes:
    """protoc proto/p402/v1/*.proto with source info -> FileDescriptorSet bytes."""
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(proto_dir, "p402", "v1", "*.proto")))
    wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    googleapis = os.path.dirname(os.path.dirname(os.path.dirname(
        importlib.util.find_spec("google.type.money_pb2").origin)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        args = ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{wkt}", f"-I{googleapis}",
                "--include_source_info", f"--descriptor_set_out={out}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("p402: protoc failed to read proto/ for the API reference")
        with open(out, "rb") as fh:
            return fh.read()


def _comments(file) -> dict[tuple, str]:
    out = {}
    for loc in file.source_code_info.location:
        text = (loc.leading_comments or "") + (loc.trailing_comments or "")
        text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
        if text:
            out[tuple(loc.path)] = text
    return out


def _type(field) -> str:
    name = field.type_name.lstrip(".") if field.type_name else _TYPES.get(field.type, "?")
    name = name.removeprefix("p402.v1.")
    if field.label == 3:  # repeated
        return f"repeated {name}"
    return name


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def render(data: bytes) -> str:
    """Markdown of a FileDescriptorSet (module docstring)."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    lines = ["# P402 wire contract (p402.v1): API reference", "",
             "Generated from the comments of proto/ at build time (apiref.py). Money is "
             "google.type.Money (USD; units + nanos, i.e. integer nano-USD); times are "
             "Unix milliseconds, UTC; a field left unset has its proto3 default (0, "
             "\"\", false, empty).", ""]
    for f in fds.file:
        if not f.package.startswith("p402."):
            continue
        c = _comments(f)
        lines += [f"## {f.name}", ""]
        for si, svc in enumerate(f.service):
            lines += [f"### service {svc.name}", "", c.get((_SERVICE, si), ""), ""]
            for mi, m in enumerate(svc.method):
                stream_in = "stream " if m.client_streaming else ""
                stream_out = "stream " if m.server_streaming else ""
                sig = (f"`{m.name}({stream_in}{m.input_type.split('.')[-1]}) returns "
                       f"({stream_out}{m.output_type.split('.')[-1]})`")
                lines.append(f"- {sig}: {c.get((_SERVICE, si, _METHOD, mi), '')}")
            lines.append("")

        def message(msg, path: tuple, prefix: str) -> None:
            lines.extend([f"### message {prefix}{msg.name}", "", c.get(path, ""), "",
                          "| field | # | type | meaning, unit, default |", "|---|---|---|---|"])
            for fi, field in enumerate(msg.field):
                text = c.get(path + (_FIELD, fi), "")
                lines.append(f"| `{field.name}` | {field.number} | `{_type(field)}` | "
                             f"{_cell(text)} |")
            lines.append("")
            for ni, nested in enumerate(msg.nested_type):
                if not nested.options.map_entry:
                    message(nested, path + (_NESTED, ni), f"{prefix}{msg.name}.")

        for mi, msg in enumerate(f.message_type):
            message(msg, (_MESSAGE, mi), "")
        for ei, enum in enumerate(f.enum_type):
            lines += [f"### enum {enum.name}", "", c.get((_ENUM, ei), ""), ""]
            for vi, v in enumerate(enum.value):
                text = c.get((_ENUM, ei, _VALUE, vi), "")
                lines.append(f"- `{v.name}` = {v.number}" + (f": {text}" if text else ""))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def field_comments(data: bytes) -> dict[str, str]:
    """{"Message.field": its comment ("" when none)} of every p402 message field."""
    from google.protobuf import descriptor_pb2

    out = {}
    for f in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        if not f.package.startswith("p402."):
            continue
        c = _comments(f)
        for mi, msg in enumerate(f.message_type):
            for fi, field in enumerate(msg.field):
                out[f"{msg.name}.{field.name}"] = c.get((_MESSAGE, mi, _FIELD, fi), "")
    return out


def _proto_dir() -> str:
    """proto/ of the source tree this module sits in (the nearest parent that has
    proto/p402/v1)."""
    here = os.path.dirname(os.path.abspath(__file__))
    while True:
        candidate = os.path.join(here, "proto")
        if os.path.isdir(os.path.join(candidate, "p402", "v1")):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            raise SystemExit("p402: no proto/p402/v1 above "
                             f"{os.path.dirname(os.path.abspath(__file__))}: the API "
                             "reference is generated from a source checkout")
        here = parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(descriptor_set(_proto_dir()))
    if argv and argv[0] != "-":
        with open(argv[0], "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

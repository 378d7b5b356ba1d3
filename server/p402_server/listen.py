"""Why a listening address could not be bound, in words a user can act on.

Owns `ListenError` (an OSError) and `listen_error(address, flag, env)`, used where
P402 binds a port (the gRPC server, the dashboard): the message names the address,
the cause (already in use, or not an address of this machine) and what to do (the
flag and environment variable that choose another address).
"""
from __future__ import annotations

import errno
import socket


class ListenError(OSError):
    """An address P402 was asked to listen on cannot be bound."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isascii() and port.isdigit() else 0


def _probe(host: str, port: int) -> int:
    """The errno of binding (host, port) now, 0 when it binds. With SO_REUSEADDR, as
    servers bind: a port in TIME_WAIT is free, a live listener is not."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            return exc.errno or errno.EADDRINUSE
    return 0


def busy(address: str) -> bool:
    """Whether "HOST:PORT" cannot be bound right now (port 0 is never busy)."""
    host, port = _split(address)
    return port != 0 and _probe(host, port) != 0


def listen_error(address: str, *, flag: str, env: str, cause: BaseException | None = None
                 ) -> ListenError:
    """The ListenError for `address` that failed to bind (module docstring)."""
    host, port = _split(address)
    code = _probe(host, port)
    how = f"choose another with {flag} HOST:PORT (env {env})"
    if code == errno.EADDRINUSE:
        msg = (f"cannot listen on {address}: port {port} is already in use (another "
               f"p402 serve, or another program: `ss -ltnp 'sport = :{port}'` shows "
               f"which). Stop it, or {how}.")
    elif code in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        msg = (f"cannot listen on {address}: {host!r} is not an address of this "
               f"machine; {how} (127.0.0.1 for this machine only, 0.0.0.0 for all).")
    elif code == errno.EACCES:
        msg = (f"cannot listen on {address}: port {port} needs privileges; {how} "
               "(a port above 1023).")
    else:
        detail = f" ({cause})" if cause else ""
        msg = f"cannot listen on {address}{detail}; {how}."
    return ListenError(code or errno.EADDRINUSE, msg)


__all__ = ["ListenError", "busy", "listen_error"]

"""Writing straight to a socket or a pipe while Twisted holds nothing for it: the one module
that touches Twisted's private write internals.

Strategy: ``transport.write`` only buffers; the bytes leave on the reactor's next turn, when
epoll says the descriptor is writable, at the price of two ``epoll_ctl`` calls and a
``doWrite`` dispatch per write — a third of the reactor's own cost of a small cached OCSP
answer, and an extra turn per batch of requests to a signing process. A write made while the
transport's buffers (``FileDescriptor.dataBuffer`` and ``_tempDataBuffer``, private) are
empty goes to the descriptor at once instead; what it does not take, and everything while
something is buffered, goes through ``transport.write``, so the order of bytes and the
producer's back-pressure stay Twisted's.

What is private here, all of it: ``FileDescriptor.dataBuffer``, ``_tempDataBuffer``, ``TLS``,
``connected`` / ``disconnecting`` and ``socket`` of a plain ``tcp.Server``, and a process
transport's ``pipes`` (fd 0's ``ProcessWriter`` and its ``fd``). ``available()`` checks them
once, at start (``server.http.site.make_http_factory`` calls it, then every writer made asks it); when Twisted no longer has
them every write goes through ``transport.write`` (correct, slower), logged once.
tests/test_twistedwrite.py fails loudly when a Twisted upgrade removes them; pyproject's
bound on twisted is the version range that test passed on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, process, tcp
from twisted.logger import Logger

log = Logger(namespace="server.http")

_state: dict[str, Any] = {"available": None}


class _NoReactor:
    """What ``missing`` passes as the reactor: ``FileDescriptor.__init__`` only stores it,
    so a descriptor can be made to inspect its attributes without touching the real one."""


def missing() -> list[str]:
    """The private internals this module needs that the installed Twisted lacks."""
    gone = []
    fd = abstract.FileDescriptor(reactor=_NoReactor())  # type: ignore[arg-type]
    for name in ("dataBuffer", "_tempDataBuffer", "connected", "disconnecting"):
        if not hasattr(fd, name):
            gone.append(f"FileDescriptor.{name}")
    if not issubclass(tcp.Server, abstract.FileDescriptor):
        gone.append("tcp.Server is a FileDescriptor")
    if not hasattr(tcp.Server, "TLS"):
        gone.append("tcp.Server.TLS")
    if not issubclass(process.ProcessWriter, abstract.FileDescriptor):
        gone.append("process.ProcessWriter is a FileDescriptor")
    return gone


def available() -> bool:
    """Whether direct writes may be used (checked once; a fallback is logged once)."""
    ok = _state["available"]
    if ok is None:
        gone = missing()
        ok = _state["available"] = not gone
        if gone:
            log.warn("Twisted's private write internals are gone ({missing}): every answer"  # noqa: G010
                     " goes through transport.write (correct, slower)", missing=", ".join(gone))
    return bool(ok)


# Answers longer than this (a large CRL) go through the transport's buffer whole: it sends
# them in memoryview slices, where a direct send would copy what the socket did not take.
DIRECT_MAX = 256 * 1024


def socket_writer(transport: Any) -> Callable[[bytes], None]:
    """How to write to transport: at once while nothing is buffered, when it is a plain
    TCP connection whose buffers we can see; else ``transport.write``."""
    def write(data: bytes) -> None:
        transport.write(data)  # looked up each time: a test may wrap it

    if (not available() or type(transport) is not tcp.Server
            or getattr(transport, "TLS", True) or not hasattr(transport, "_tempDataBuffer")):
        return write
    sock = getattr(transport, "socket", None)
    if sock is None:
        return write
    send = sock.send
    t = transport

    def send_now(data: bytes) -> None:
        if (len(data) <= DIRECT_MAX and not t.dataBuffer and not t._tempDataBuffer
                and t.connected and not t.TLS and not t.disconnecting):
            try:
                n = send(data)
            except OSError:  # EAGAIN; or an error the transport reports once it writes
                n = 0
            if n == len(data):
                return
            data = data[n:]
        t.write(data)

    return send_now


def pipe_write(transport: Any, data: bytes) -> None:
    """Write data to a child process's stdin (``transport``: its process transport): at
    once while Twisted holds nothing for the pipe, else (and what the pipe did not take)
    through ``transport.write``. Nothing is written once the pipe is closed (the process is
    ending: its ``processEnded`` answers for it)."""
    pipes = getattr(transport, "pipes", None)
    if pipes is None or not available():
        transport.write(data)
        return
    writer = pipes.get(0)
    if writer is None:
        return
    written = 0
    if not writer.dataBuffer and not writer._tempDataBuffer:
        try:
            written = os.write(writer.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # a broken pipe: processEnded follows
    if written < len(data):
        transport.write(data[written:])

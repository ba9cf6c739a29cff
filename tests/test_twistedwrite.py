"""Twisted's private write internals (server/twistedwrite.py): present in the Twisted this
runs on — this test fails loudly when an upgrade removes them —, a fallback to
``transport.write`` when they are gone, and pyproject's bound on twisted."""

from __future__ import annotations

import re
import socket
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, tcp
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from server import twistedwrite

ROOT = Path(__file__).resolve().parents[1]
UPGRADE = ("Twisted {v} changed the private write internals server/twistedwrite.py uses ({what}):"
           " adapt that module (its fallback, transport.write, keeps the server correct but"
           " slower) and pyproject's bound on twisted")


def test_the_installed_twisted_has_the_internals() -> None:
    gone = twistedwrite.missing()
    assert gone == [], UPGRADE.format(v=version("twisted"), what=", ".join(gone))
    assert twistedwrite.available()


@pytest_twisted.ensureDeferred
async def test_real_transports_have_them() -> None:
    """A real TCP server connection and a real child process's stdin pipe."""
    from twisted.internet import reactor

    accepted: defer.Deferred[Any] = defer.Deferred()

    class Keep(protocol.Protocol):
        def connectionMade(self) -> None:
            accepted.callback(self.transport)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Keep), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        transport = await accepted
        what = [n for n in ("dataBuffer", "_tempDataBuffer", "socket", "TLS", "connected",
                            "disconnecting") if not hasattr(transport, n)]
        assert type(transport) is tcp.Server and not what, UPGRADE.format(
            v=version("twisted"), what=", ".join(what) or type(transport).__name__)
        writer = twistedwrite.socket_writer(transport)
        assert writer.__name__ == "send_now"  # the direct path, not the fallback
        writer(b"hello")  # nothing buffered: straight to the socket
        assert not transport.dataBuffer and not transport._tempDataBuffer
        assert client.recv(5) == b"hello"
        transport.loseConnection()
    finally:
        client.close()
        await port.stopListening()

    ended: defer.Deferred[None] = defer.Deferred()

    class Child(protocol.ProcessProtocol):
        def __init__(self) -> None:
            self.out = b""

        def outReceived(self, data: bytes) -> None:
            self.out += data

        def processEnded(self, reason: Any) -> None:
            ended.callback(None)

    child = Child()
    proc = reactor.spawnProcess(child, sys.executable, [sys.executable, "-c",
                                "import sys; sys.stdout.write(sys.stdin.read())"],
                                childFDs={0: "w", 1: "r", 2: 2})
    pipe = getattr(proc, "pipes", {}).get(0)
    what = [n for n in ("fd", "dataBuffer", "_tempDataBuffer") if not hasattr(pipe, n)]
    assert pipe is not None and not what, UPGRADE.format(v=version("twisted"),
                                                         what=", ".join(what) or "pipes")
    twistedwrite.pipe_write(proc, b"through the pipe")
    proc.closeStdin()
    await ended
    assert child.out == b"through the pipe"


def test_without_the_internals_every_write_goes_through_transport_write(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(twistedwrite, "_state", {"available": None})
    monkeypatch.setattr(twistedwrite, "missing", lambda: ["FileDescriptor._tempDataBuffer"])
    with capturedLogs() as events:
        assert not twistedwrite.available()
        assert not twistedwrite.available()  # checked once, logged once
    assert len([e for e in events if "private write internals" in e["log_format"]]) == 1
    transport = StringTransport()
    twistedwrite.socket_writer(transport)(b"buffered")
    assert transport.value() == b"buffered"

    class Pipe:
        pipes = {0: object()}  # no buffers to look at: must not be touched

        def __init__(self) -> None:
            self.written = b""

        def write(self, data: bytes) -> None:
            self.written += data

    pipe = Pipe()
    twistedwrite.pipe_write(pipe, b"framed")
    assert pipe.written == b"framed"


def test_pyproject_bounds_twisted_to_the_tested_major() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"twisted\b", d, re.I))
    found = re.fullmatch(r"twisted>=(\d+)\.(\d+),<(\d+)", spec.replace(" ", ""))
    assert found, f"twisted needs a lower and an upper bound in pyproject.toml: {spec!r}"
    low, upper = (int(found.group(1)), int(found.group(2))), int(found.group(3))
    installed = tuple(int(p) for p in version("twisted").split(".")[:2])
    # the upper bound is the next major after the newest these tests passed on (26.x)
    assert low <= installed < (upper, 0) and upper <= installed[0] + 1 or installed[0] < 26, (
        spec, version("twisted"))

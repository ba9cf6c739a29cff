"""A signing process: ``python -m server.ocsp.signworker PARENT_PID``, spawned by
``server.ocsp.signing.ProcessSigners``.

Strategy: stdin and stdout carry length-prefixed pickles, one message each (the parent is
the only writer: no untrusted bytes are unpickled here). The first message gives the
configuration, the store location and the parent's time; the process loads the signers
(PKCS#11 tokens open their own session here), opens its own store connection, lowers its CPU
priority by ``NICE`` (the server's cheap work comes first when the cores are busy) and says
``ready``. Then each ``job`` is answered by ``OcspService.compute`` (parse, store reads,
sign; no cache: the parent keeps the answers) with a ``done`` carrying the ``Signed``, in
order. ``reload`` installs new signers. End of stdin (the parent closed it or died) ends
the process; on Linux it is also killed when its parent dies.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback
from datetime import datetime
from typing import Any, BinaryIO

NICE = 10  # CPU priority below the server's: signing yields to cheap answers
_FRAME = struct.Struct(">I")


def read_message(inp: BinaryIO) -> Any:
    head = inp.read(4)
    if len(head) < 4:
        return None
    (n,) = _FRAME.unpack(head)
    data = inp.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)  # noqa: S301 - written by our parent only


def write_message(out: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    out.write(_FRAME.pack(len(data)) + data)
    out.flush()


class _Clock:
    """The time of the request being answered (the parent's clock, passed per job)."""

    def __init__(self, now: datetime) -> None:
        self.at = now

    def __call__(self) -> datetime:
        return self.at


def _forward_errors(out: BinaryIO) -> None:
    """Send this process's error log events (with tracebacks) to the parent's log."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    def observer(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is None or level < LogLevel.info:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        write_message(out, ("log", text, level.name))

    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                     redirectStandardIO=False)


class _ForwardedMetrics:
    """Stands for ``server.metrics.get_metrics()`` here: each count made while signing
    (``signer_unavailable`` of a token gone) is sent to the parent, whose /metrics shows it."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def forward(*args: Any) -> None:
            write_message(self._out, ("metric", name, args))

        return forward


def main(argv: list[str]) -> int:
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    if len(argv) > 1:
        from server.workers import die_with_parent

        die_with_parent(int(argv[1]))
    first = read_message(inp)
    if first is None or first[0] != "init":
        return 2
    _, config, location, now = first
    clock = _Clock(now)
    try:
        from server.ocsp.service import OcspService
        from store import open_store

        from server import metrics

        _forward_errors(out)
        metrics.set_metrics(_ForwardedMetrics(out))  # type: ignore[arg-type]
        store = open_store(location, create=False, migrate=False)
        service = OcspService(config, store, clock)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which logs it
        write_message(out, ("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        os.nice(NICE)
    except OSError:
        pass
    write_message(out, ("ready",))
    while True:
        message = read_message(inp)
        if message is None:
            break
        kind = message[0]
        if kind == "job":
            _, job_id, der, now, sign_unknown = message
            clock.at = now
            signed = service.compute(der, now, sign_unknown=sign_unknown, peek=False)
            write_message(out, ("done", job_id, signed))
        elif kind == "reload":
            clock.at = message[2]
            try:
                service.reload(message[1])
            except Exception:  # noqa: BLE001 - the old signers stay; the parent logs why
                write_message(out, ("log", "reload failed, old signers kept:\n"
                                    + traceback.format_exc(limit=5)))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

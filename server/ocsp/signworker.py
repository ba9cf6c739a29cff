"""A signing process: ``python -m server.ocsp.signworker PARENT_PID``, spawned by
``server.ocsp.signing.ProcessSigners``.

Strategy: stdin and stdout carry length-prefixed pickles, one message each (the parent is
the only writer: no untrusted bytes are unpickled here); requests that arrive together are
answered together, ``REPLY_BATCH`` answers per write. The first message gives the
configuration, the store location and the parent's time; the process loads the signers
(PKCS#11 tokens open their own session here), opens its own store connection, lowers its CPU
priority by ``NICE`` (the server's cheap work comes first when the cores are busy) and says
``ready``. Then each ``nonce`` (the parts of a cached answer and a nonce) is answered by
``OcspService.sign_nonce`` (one signature, no store read) with a ``signed``, and each ``job``
by ``OcspService.compute`` (parse, store reads, sign; no cache: the parent keeps the
answers) with a ``done`` carrying the ``Signed``, in order. ``reload`` installs new signers.
End of stdin (the parent closed it or died) ends the process; on Linux it is also killed
when its parent dies.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback
from datetime import datetime
from typing import Any, BinaryIO

from store.lifeline import die_with_parent

NICE = 10  # CPU priority below the server's: signing yields to cheap answers
REPLY_BATCH = 8  # answers written together at most: the parent hands out more meanwhile
_FRAME = struct.Struct(">I")


def write_message(out: BinaryIO, message: Any) -> None:
    out.write(frame(message))
    out.flush()


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def split_frames(buf: bytearray) -> list[Any]:
    """The whole messages at the start of buf, removed from it (a partial one stays)."""
    messages = []
    start = 0
    while len(buf) - start >= 4:
        (n,) = _FRAME.unpack_from(buf, start)
        if len(buf) - start - 4 < n:
            break
        messages.append(pickle.loads(buf[start + 4:start + 4 + n]))  # noqa: S301 - ours
        start += 4 + n
    del buf[:start]
    return messages


class Frames:
    """Messages from a pipe: each ``read`` waits for data, then returns every whole message
    that came (several requests arrive together under load: they are answered together, in
    one write)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()

    def read(self) -> list[Any] | None:
        """The messages now complete (at least one); None at the end of the pipe."""
        while True:
            data = os.read(self.fd, 1 << 16)
            if not data:
                return None
            self._buf += data
            messages = split_frames(self._buf)
            if messages:
                return messages


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the frames
    if len(argv) > 1:
        die_with_parent(int(argv[1]))
    frames = Frames(0)
    pending = frames.read()
    if not pending or pending[0][0] != "init":
        return 2
    _, config, location, now = pending.pop(0)
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
    while pending is not None:
        replies: list[bytes] = []
        for message in pending:
            kind = message[0]
            if kind == "nonce":  # ("nonce", id, CA name, producedAt, responses, nonce, ext)
                replies.append(frame(("signed", message[1],
                                      service.sign_nonce(*message[2:]))))
            elif kind == "job":
                _, job_id, der, now, sign_unknown = message
                clock.at = now
                signed = service.compute(der, now, sign_unknown=sign_unknown)
                replies.append(frame(("done", job_id, signed)))
            elif kind == "reload":
                clock.at = message[2]
                try:
                    service.reload(message[1])
                except Exception:  # noqa: BLE001 - the old signers stay; the parent logs why
                    write_message(out, ("log", "reload failed, old signers kept:\n"
                                        + traceback.format_exc(limit=5)))
            if len(replies) >= REPLY_BATCH:  # the parent hands out more meanwhile
                write_all(1, b"".join(replies))
                replies.clear()
        if replies:
            write_all(1, b"".join(replies))
        pending = frames.read()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Log output: one line per event, ``logfmt`` by default or JSON lines, to stdout or a file.

Strategy: a twisted.logger observer renders each event's message and appends its keyword
fields (those not starting with ``log_``) as key=value pairs, so a line stays greppable and
machine-readable at once. A file target is reopened on SIGUSR1 for logrotate. Fields named
like secrets are never written, whatever a caller passes. Process-wide fields (a worker's
``worker=<n>``) set with ``set_global_fields`` come first on every line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

_REDACTED = frozenset({"password", "key", "private_key", "body", "secret", "credentials"})
_GLOBAL_FIELDS: dict[str, str | int] = {}
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error}


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and all(c.isalnum() or c in "-_./:@,;+=" for c in text) and "=" not in text[:1]:
        return text
    return json.dumps(text, ensure_ascii=False)


def set_global_fields(**fields: str | int) -> None:
    """Add fields to every line this process writes (e.g. worker=2)."""
    _GLOBAL_FIELDS.update(fields)


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(_GLOBAL_FIELDS)
    for k, v in event.items():
        if k.startswith("log_") or k in ("format", "message", "system", "isError", "time"):
            continue
        if k.lower() in _REDACTED:
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


def render(event: dict[str, Any], fmt: str) -> str:
    """One log line (without newline) for an event."""
    when = datetime.fromtimestamp(event.get("log_time", 0), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    level = event.get("log_level", LogLevel.info).name
    namespace = str(event.get("log_namespace", ""))
    system = namespace.split(".")[1] if namespace.startswith(("server.", "store.")) else namespace
    msg = formatEvent(event) or ""
    failure = event.get("log_failure")
    if failure is not None:
        msg = msg + "\n" + failure.getTraceback()
    fields = _fields(event)
    if fmt == "json":
        return json.dumps({"time": when, "level": level, "system": system, "msg": msg, **fields},
                          ensure_ascii=False, default=str)
    parts = [f"time={when}", f"level={level}", f"system={_logfmt_value(system)}",
             f"msg={json.dumps(msg, ensure_ascii=False)}"]
    parts += [f"{k}={_logfmt_value(v)}" for k, v in fields.items()
              if f"{k}=" not in msg]  # fields already in the message are not repeated
    return " ".join(parts)


@implementer(ILogObserver)
class LineObserver:
    """Writes rendered events to a stream or to a file that can be reopened."""

    def __init__(self, fmt: str, stream: TextIO | None = None, path: Path | None = None) -> None:
        self.fmt = fmt
        self.path = path
        self._lock = threading.Lock()
        self._stream: TextIO = stream if stream is not None else sys.stdout
        if path is not None:
            self._stream = self._open(path)

    @staticmethod
    def _open(path: Path) -> TextIO:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        """Reopen the log file (after logrotate moved it)."""
        if self.path is None:
            return
        with self._lock:
            old, self._stream = self._stream, self._open(self.path)
            old.close()

    def __call__(self, event: dict[str, Any]) -> None:
        line = render(event, self.fmt)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a full disk or closed stdout must not take the server down


def start_logging(fmt: str = "logfmt", level: str = "info", path: Path | None = None,
                  stream: TextIO | None = None) -> LineObserver:
    """Route all twisted.logger events to one LineObserver; SIGUSR1 reopens a log file."""
    observer = LineObserver(fmt, stream=stream, path=path)
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate])], redirectStandardIO=False,
        discardBuffer=True,
    )
    if path is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: observer.reopen())
    return observer

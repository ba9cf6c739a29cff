"""Log output: one line per event, ``logfmt`` by default or JSON lines, to stdout or a file.

Strategy: a twisted.logger observer renders each event's message and appends its keyword
fields (those not starting with ``log_``) as key=value pairs, so a line stays greppable and
machine-readable at once. A file target is reopened on SIGUSR1 for logrotate. Fields named
like secrets are never written, whatever a caller passes. Process-wide fields (a worker's
``worker=<n>``) set with ``set_global_fields`` come first on every line.

Cost (issues 3, 4, 7: the info line was most of the CPU of a cached OCSP answer). The line is
byte for byte what ``twisted.logger.formatEvent`` and a plain per-field encoder give (the
tests compare both on generated events), but built from what is remembered: each message
template is parsed once (plain ``{name}`` / ``{name!r:spec}`` fields; anything else goes to
``formatEvent``), each field name is classified once (skipped, redacted, its ``name=``
prefix), short values are encoded once, the timestamp comes from ``isoformat``. Writes are
buffered only while the reactor runs and only for events from its thread: the first pending
line schedules one flush ``FLUSH_INTERVAL`` later, so a loaded server writes a batch of lines
per system call instead of one. Nothing waits behind a warning or an error (they flush the
batch at once), a full batch, a reopen (pending lines go to the old file first), the reactor's
shutdown (SIGTERM) or the interpreter's exit. Outside the reactor — the import daemon, the
supervisor, start-up and shutdown, other threads — every line is written and flushed at once,
as before.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import string
import sys
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from zope.interface import implementer

_REDACTED = frozenset({"password", "key", "private_key", "body", "secret", "credentials"})
_SKIPPED = frozenset({"format", "message", "system", "isError", "time"})
_GLOBAL_FIELDS: dict[str, str | int] = {}
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error}

_URGENT = frozenset((LogLevel.warn, LogLevel.error, LogLevel.critical))  # never buffered
FLUSH_INTERVAL = 0.05  # seconds an info line may wait in the buffer while the reactor runs
MAX_PENDING = 256  # lines; a fuller buffer is written at once
_MEMO_ENTRIES = 4096  # bound of each memo below (cleared when full)
_MEMO_VALUE_CHARS = 64  # longer values are encoded each time, not remembered


def _logfmt_value(value: object) -> str:
    """The reference encoding of one logfmt value (bare when safe, else a JSON string)."""
    text = value if isinstance(value, str) else str(value)
    if text and all(c.isalnum() or c in "-_./:@,;+=" for c in text) and "=" not in text[:1]:
        return text
    return json.dumps(text, ensure_ascii=False)


# ``\w`` on str is exactly ``str.isalnum()`` plus "_" (both use Py_UNICODE_ISALNUM).
_BARE = re.compile(r"[\w\-./:@,;+=]+")
_values: dict[str, str] = {}


def _encode_str(text: str) -> str:
    """``_logfmt_value`` of a plain str, remembered for short values."""
    found = _values.get(text)
    if found is not None:
        return found
    if _BARE.fullmatch(text) is not None and text[0] != "=":
        out = text
    else:
        out = json.dumps(text, ensure_ascii=False)
    if len(text) <= _MEMO_VALUE_CHARS:
        if len(_values) >= _MEMO_ENTRIES:
            _values.clear()
        _values[text] = out
    return out


def _encode(value: object) -> str | None:
    """The logfmt value of a field, None for a type that is not written."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)  # type: ignore[arg-type]
    if kind is int or kind is float or kind is bool or value is None:
        # str() of these is digits, letters, "-", "+" and ".": always bare.
        return str(value)
    if isinstance(value, (str, int, float, bool)):
        # Subclasses may have their own __str__, which formatting (not concatenation) uses.
        return format(_logfmt_value(value))
    return None


def set_global_fields(**fields: str | int) -> None:
    """Add fields to every line this process writes (e.g. worker=2)."""
    _GLOBAL_FIELDS.update(fields)


# Field name -> its "name=" prefix, or None when the field is never written.
_names: dict[str, str | None] = {}


def _name_prefix(k: str) -> str | None:
    prefix = _names.get(k, "")
    if prefix != "":
        return prefix
    keep = not (k.startswith("log_") or k in _SKIPPED or k.lower() in _REDACTED)
    prefix = k + "=" if keep else None
    if len(_names) >= _MEMO_ENTRIES:
        _names.clear()
    _names[k] = prefix
    return prefix


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(_GLOBAL_FIELDS)
    for k, v in event.items():
        if _name_prefix(k) is None:
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


# --- the message ---------------------------------------------------------------------------

_parse = string.Formatter().parse
_CONVERT = {None: None, "r": repr, "s": str, "a": ascii}


class _Template:
    """A message format parsed once: literal text and plain named fields."""

    __slots__ = ("constant", "layouts", "pieces", "plan")

    def __init__(self, pieces: tuple[tuple[str, str | None, Any, str], ...] | None,
                 constant: str | None) -> None:
        self.pieces = pieces  # None: not plain, formatEvent renders it
        self.constant = constant  # the message when the format has no field
        # Field name -> (its "name=" prefix, or None: never written after this message;
        # whether the rendered message must still be searched for the prefix).
        self.plan: dict[str, tuple[str | None, bool]] = {}
        # The event's keys, in order -> the fields written after the message: one call site
        # always sends the same keys, so the per-key decisions are taken once.
        self.layouts: dict[tuple[str, ...], tuple[tuple[str, str, bool], ...]] = {}

    def layout(self, keys: tuple[str, ...]) -> tuple[tuple[str, str, bool], ...]:
        written = []
        for k in keys:
            planned = self.plan.get(k)
            prefix, check = planned if planned is not None else self.field(k)
            if prefix is not None:
                written.append((k, prefix, check))
        if len(self.layouts) >= _MEMO_ENTRIES:
            self.layouts.clear()
        layout = self.layouts[keys] = tuple(written)
        return layout

    def field(self, k: str) -> tuple[str | None, bool]:
        """How the field k is written after a message rendered from this template."""
        prefix = _name_prefix(k)
        if prefix is None:
            found: tuple[str | None, bool] = (None, False)
        elif self.constant is not None:
            found = (None if prefix in self.constant else prefix, False)
        elif self.pieces is not None and any(prefix in lit for lit, *_ in self.pieces):
            found = (None, False)  # the literal text is in every message: never repeated
        else:
            found = (prefix, True)  # a value may bring "name=" into the message
        if len(self.plan) >= _MEMO_ENTRIES:
            self.plan.clear()
        self.plan[k] = found
        return found


_templates: dict[str, _Template] = {}


def _template(fmt: str) -> _Template:
    found = _templates.get(fmt)
    if found is not None:
        return found
    pieces: list[tuple[str, str | None, Any, str]] = []
    plain = True
    try:
        for literal, name, spec, conversion in _parse(fmt):
            if name is None:
                pieces.append((literal, None, None, ""))
                continue
            if (not name.isidentifier() or conversion not in _CONVERT
                    or "{" in (spec or "")):  # "a.b", "a[0]", "f()", nested specs
                plain = False
                break
            pieces.append((literal, name, _CONVERT[conversion], spec or ""))
    except ValueError:  # unbalanced braces: formatEvent reports it
        plain = False
    if not plain:
        template = _Template(None, None)
    elif all(name is None for _, name, _, _ in pieces):
        template = _Template(tuple(pieces), "".join(literal for literal, *_ in pieces))
    else:
        template = _Template(tuple(pieces), None)
    if len(_templates) >= _MEMO_ENTRIES:
        _templates.clear()
    _templates[fmt] = template
    return template


def _message(event: dict[str, Any]) -> tuple[str, _Template | None]:
    """``formatEvent(event) or ""``, without re-parsing the format on every event, and the
    template it came from (None: from formatEvent)."""
    fmt = event.get("log_format")
    if type(fmt) is not str or "log_flattened" in event:
        return formatEvent(event) or "", None
    template = _template(fmt)
    if template.constant is not None:
        return template.constant, template
    if template.pieces is None:
        return formatEvent(event) or "", None
    out = []
    try:
        for literal, name, convert, spec in template.pieces:
            out.append(literal)
            if name is not None:
                value = event[name]
                if convert is not None:
                    value = convert(value)
                out.append(format(value, spec))
    except Exception:  # noqa: BLE001 - a missing field or a bad spec: formatEvent says so
        return formatEvent(event) or "", None
    return "".join(out), template


# --- the line ------------------------------------------------------------------------------

_systems: dict[str, tuple[str, str]] = {}  # namespace -> (system, "system=<logfmt>")
_json_messages: dict[str, str] = {}


def _system(namespace: str) -> tuple[str, str]:
    found = _systems.get(namespace)
    if found is None:
        system = (namespace.split(".")[1] if namespace.startswith(("server.", "store."))
                  else namespace)
        found = (system, "system=" + _logfmt_value(system))
        if len(_systems) >= _MEMO_ENTRIES:
            _systems.clear()
        _systems[namespace] = found
    return found


def _when(event: dict[str, Any]) -> str:
    moment = datetime.fromtimestamp(event.get("log_time", 0), UTC)
    if moment.year < 1000:  # strftime does not pad the year
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def _fragment(fields: Any, msg: str) -> str:
    """The logfmt ``name=value`` pairs of one mapping of a batch (see ``render``)."""
    parts = []
    for k, v in fields.items():
        prefix = _name_prefix(k)
        if prefix is None or prefix in msg:
            continue
        encoded = _values.get(v) if type(v) is str else None
        if encoded is None:
            encoded = _encode(v)
            if encoded is None:
                continue
        parts.append(prefix + encoded)
    return " ".join(parts)


def _render_batch(event: dict[str, Any], batch: Any, fmt: str) -> str:
    """The lines of a batch event: one per item of ``log_batch``, each item a sequence of
    field mappings written in order after the event's time, level, system and message (the
    HTTP access log: a route's fields are one mapping shared by many lines, encoded once;
    an item shared by several lines is rendered once)."""
    when = _when(event)
    level = event.get("log_level", LogLevel.info).name
    system, system_part = _system(str(event.get("log_namespace", "")))
    msg, _ = _message(event)
    lines = []
    if fmt == "json":
        known: dict[int, str] = {}
        for item in batch:
            line = known.get(id(item))
            if line is None:
                fields = dict(_GLOBAL_FIELDS)
                for mapping in item:
                    fields.update(mapping)
                fields = _fields(fields)
                line = known[id(item)] = json.dumps(
                    {"time": when, "level": level, "system": system, "msg": msg, **fields},
                    ensure_ascii=False, default=str)
            lines.append(line)
        return "\n".join(lines)
    head = ["time=" + when, "level=" + level, system_part, "msg=" + json.dumps(msg)]
    if _GLOBAL_FIELDS:
        head.append(_fragment(_GLOBAL_FIELDS, msg))
    start = " ".join(head)
    done: dict[int, str] = {}  # id of a mapping -> its pairs (the batch keeps it alive)
    rendered: dict[int, str] = {}  # id of an item (one several lines share) -> its line
    for item in batch:
        line = rendered.get(id(item))
        if line is None:
            parts = [start]
            for mapping in item:
                fragment = done.get(id(mapping))
                if fragment is None:
                    fragment = done[id(mapping)] = _fragment(mapping, msg)
                if fragment:
                    parts.append(fragment)
            line = rendered[id(item)] = " ".join(parts)
        lines.append(line)
    return "\n".join(lines)


def render(event: dict[str, Any], fmt: str) -> str:
    """One log line (without newline) for an event; the lines of a batch event (one whose
    ``log_batch`` holds one sequence of field mappings per line)."""
    batch = event.get("log_batch")
    if batch is not None:
        return _render_batch(event, batch, fmt)
    when = _when(event)
    level = event.get("log_level", LogLevel.info).name
    system, system_part = _system(str(event.get("log_namespace", "")))
    msg, template = _message(event)
    failure = event.get("log_failure")
    if failure is not None:
        msg = msg + "\n" + failure.getTraceback()
        template = None
    if fmt == "json":
        fields = _fields(event)
        return json.dumps({"time": when, "level": level, "system": system, "msg": msg, **fields},
                          ensure_ascii=False, default=str)
    quoted = _json_messages.get(msg)
    if quoted is None:
        quoted = json.dumps(msg, ensure_ascii=False)
        if len(msg) <= _MEMO_VALUE_CHARS:
            if len(_json_messages) >= _MEMO_ENTRIES:
                _json_messages.clear()
            _json_messages[msg] = quoted
    parts = ["time=" + when, "level=" + level, system_part, "msg=" + quoted]
    if _GLOBAL_FIELDS or template is None:
        for k, v in _fields(event).items():
            name = k + "="
            if name not in msg:  # fields already in the message are not repeated
                parts.append(name + (_encode(v) or ""))
        return " ".join(parts)
    keys = tuple(event)
    layout = template.layouts.get(keys)
    if layout is None:  # (an empty layout is a valid one: every field is in the message)
        layout = template.layout(keys)
    for k, prefix, check in layout:
        if check and prefix in msg:
            continue
        v = event[k]
        encoded: str | None
        if type(v) is str:
            encoded = _values.get(v) or _encode_str(v)
        else:
            encoded = _encode(v)
            if encoded is None:
                continue
        parts.append(prefix + encoded)
    return " ".join(parts)


# --- the observer --------------------------------------------------------------------------

_observers: weakref.WeakSet[LineObserver] = weakref.WeakSet()


def flush_buffered() -> None:
    """Write every observer's pending lines now (at exit, and for benchmarks and tests)."""
    for observer in list(_observers):
        observer.flush()


atexit.register(flush_buffered)


def _running_reactor() -> Any:
    """The reactor, if one is installed and running (never installs one)."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or not getattr(reactor, "running", False):
        return None
    return reactor


@implementer(ILogObserver)
class LineObserver:
    """Writes rendered events to a stream or to a file that can be reopened."""

    def __init__(self, fmt: str, stream: TextIO | None = None, path: Path | None = None, *,
                 reactor: Any = None) -> None:
        self.fmt = fmt
        self._reactor = reactor  # None: the global one, once installed and running
        self.path = path
        self._lock = threading.RLock()
        self._stream: TextIO = stream if stream is not None else sys.stdout
        if path is not None:
            self._stream = self._open(path)
        self._pending: list[str] = []
        self._timer: Any = None
        self._shutdown_hooked: Any = None  # the reactor whose shutdown flushes us
        self._reopen_requested = False
        _observers.add(self)

    @staticmethod
    def _open(path: Path) -> TextIO:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        """Reopen the log file (after logrotate moved it); pending lines go to the old one."""
        if self.path is None:
            return
        with self._lock:
            self._reopen_requested = False
            self._write(())
            old, self._stream = self._stream, self._open(self.path)
            old.close()

    def request_reopen(self) -> None:
        """From a signal handler: reopen soon, outside whatever the handler interrupted."""
        self._reopen_requested = True
        reactor = self._running()
        if reactor is not None:
            reactor.callFromThread(self._reopen_if_requested)

    def _reopen_if_requested(self) -> None:
        if self._reopen_requested:
            self.reopen()

    def _running(self) -> Any:
        if self._reactor is None:
            return _running_reactor()
        return self._reactor if getattr(self._reactor, "running", False) else None

    def flush(self) -> None:
        """Write the pending lines now."""
        with self._lock:
            if self._timer is not None:
                if self._timer.active():
                    self._timer.cancel()
                self._timer = None
            self._write(())

    def _write(self, lines: tuple[str, ...] | list[str]) -> None:
        """Write pending lines, then lines, and flush (the lock is held)."""
        if self._pending:
            lines = [*self._pending, *lines]
            self._pending = []
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a full disk or closed stdout must not take the server down

    def __call__(self, event: dict[str, Any]) -> None:
        line = render(event, self.fmt)
        with self._lock:
            if self._reopen_requested:
                self.reopen()
            reactor = self._running()
            # Only the reactor's (the main) thread buffers: only it may call callLater.
            if (reactor is None or event.get("log_level") in _URGENT or "log_failure" in event
                    or threading.get_ident() != threading.main_thread().ident):
                self._write((line,))
                return
            self._pending.append(line)
            if len(self._pending) >= MAX_PENDING:
                self.flush()
            elif self._timer is None:
                if self._shutdown_hooked is not reactor:
                    reactor.addSystemEventTrigger("after", "shutdown", self.flush)
                    self._shutdown_hooked = reactor
                self._timer = reactor.callLater(FLUSH_INTERVAL, self.flush)


@implementer(ILogObserver)
class LevelFilter:
    """What ``FilteringLogObserver`` with a ``LogLevelFilterPredicate`` of one default level
    lets through (an event with a level, a namespace, and the level at least ``level``), by
    one set lookup instead of a namespace walk per event."""

    def __init__(self, observer: Any, level: LogLevel) -> None:
        self.observer = observer
        self.levels = frozenset(lv for lv in LogLevel.iterconstants() if lv >= level)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in self.levels and event.get("log_namespace"):
            if event["log_namespace"] == "log_legacy" and twisted_noise(event):
                return
            self.observer(event)


# Twisted's own lines about listening ports and factories ("LdapFactory starting on 1389",
# "(TCP Port 1389 Closed)", "Starting factory <...LdapFactory object at 0x...>"): a port logs
# them whatever its factory's ``noisy`` says. certpub writes its own line per listener
# (``server.app``: msg="listening" service=... endpoint=...).
_TWISTED_NOISE = re.compile(r"\S+ starting on \d+|\(\S+ Port \d+ Closed\)"
                            r"|(?:Starting|Stopping) factory .*", re.S)


def twisted_noise(event: dict[str, Any]) -> bool:
    """A legacy Twisted event that only says a port or factory started or stopped."""
    message = event.get("message")
    if not isinstance(message, tuple) or len(message) != 1 or not isinstance(message[0], str):
        return False
    return _TWISTED_NOISE.fullmatch(message[0]) is not None


def start_logging(fmt: str = "logfmt", level: str = "info", path: Path | None = None,
                  stream: TextIO | None = None) -> LineObserver:
    """Route all twisted.logger events to one LineObserver; SIGUSR1 reopens a log file."""
    observer = LineObserver(fmt, stream=stream, path=path)
    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, LevelFilter(observer, _LEVELS[level]))], redirectStandardIO=False,
        discardBuffer=True,
    )
    if path is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda *_: observer.request_reopen())
    return observer

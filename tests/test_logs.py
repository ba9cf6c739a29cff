"""Log lines: byte for byte the reference rendering; buffered writes that never lose a line."""

from __future__ import annotations

import enum
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from server import logs

REPO = Path(__file__).resolve().parent.parent

# --- the reference: the renderer before the fast path (formatEvent + a per-field encoder) --


def ref_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and all(c.isalnum() or c in "-_./:@,;+=" for c in text) and "=" not in text[:1]:
        return text
    return json.dumps(text, ensure_ascii=False)


def ref_fields(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(logs._GLOBAL_FIELDS)
    for k, v in event.items():
        if k.startswith("log_") or k in ("format", "message", "system", "isError", "time"):
            continue
        if k.lower() in logs._REDACTED:
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


def ref_render(event: dict[str, Any], fmt: str) -> str:
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(event.get("log_time", 0), UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    level = event.get("log_level", LogLevel.info).name
    namespace = str(event.get("log_namespace", ""))
    system = namespace.split(".")[1] if namespace.startswith(("server.", "store.")) else namespace
    msg = formatEvent(event) or ""
    failure = event.get("log_failure")
    if failure is not None:
        msg = msg + "\n" + failure.getTraceback()
    fields = ref_fields(event)
    if fmt == "json":
        return json.dumps({"time": when, "level": level, "system": system, "msg": msg, **fields},
                          ensure_ascii=False, default=str)
    parts = [f"time={when}", f"level={level}", f"system={ref_value(system)}",
             f"msg={json.dumps(msg, ensure_ascii=False)}"]
    parts += [f"{k}={ref_value(v)}" for k, v in fields.items() if f"{k}=" not in msg]
    return " ".join(parts)


class Color(enum.IntEnum):
    RED = 1


class Tag(str):
    def __str__(self) -> str:
        return "tag with spaces"


FORMATS = [
    "http request",
    "",
    None,
    "{{literal}} braces",
    ("conn={conn} op={op} SEARCH RESULT tag=101 err={err} nentries={n} etime={etime:.4f} "
     'text="{text}"'),
    "conn={conn} ACCEPT from IP={peer} (IP={local})",
    "value {text!r} and {op!s:>6} and {peer!a}",
    "{warning}",
    "attribute {peer.real}",  # not plain: formatEvent
    "call {fn()}",  # not plain: formatEvent
    "missing {absent}",  # unformattable
    "unbalanced {conn",  # unformattable
    "bad spec {op:zz}",  # unformattable
    "positional {}",  # unformattable
    "text={text} only",
    b"bytes {conn}",
]

values = st.one_of(
    st.text(max_size=12), st.text(alphabet="ab=_-./ \"\\\né日", max_size=8),
    st.sampled_from(["", "=x", "op=5", "a b", "127.0.0.1", "good,revoked", "ünï", "x\ty",
                     "key=secret"]),
    st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.binary(max_size=4), st.just([1, 2]),
    st.just(Color.RED), st.just(Tag("t")),
)
names = st.sampled_from(["conn", "op", "err", "n", "etime", "text", "peer", "local", "warning",
                         "client", "status", "bytes", "key", "Password", "body", "time",
                         "system", "format", "log_extra", "worker", "fn", "x=y", "é"])


def _event(fmt: Any, fields: dict[str, Any], level: Any, namespace: str,
           when: float) -> dict[str, Any]:
    event = dict(fields)
    event.update(log_logger=None, log_level=level, log_namespace=namespace, log_source=None,
                 log_format=fmt, log_time=when)
    return event


@settings(max_examples=600, deadline=None)
@given(fmt=st.sampled_from(FORMATS), fields=st.dictionaries(names, values, max_size=8),
       level=st.sampled_from([LogLevel.info, LogLevel.warn, LogLevel.debug]),
       namespace=st.sampled_from(["server.http", "store.spool", "other", "",
                                  "server.x y"]),
       when=st.floats(0, 4e9), out=st.sampled_from(["logfmt", "json"]),
       worker=st.sampled_from([None, 2]))
def test_render_is_the_reference_byte_for_byte(fmt: Any, fields: dict[str, Any], level: Any,
                                               namespace: str, when: float, out: str,
                                               worker: int | None) -> None:
    saved = dict(logs._GLOBAL_FIELDS)
    try:
        if worker is not None:
            logs._GLOBAL_FIELDS["worker"] = worker
        event = _event(fmt, fields, level, namespace, when)
        expected = ref_render(event, out)
        assert logs.render(event, out) == expected
        assert logs.render(event, out) == expected  # again, from the memos
    finally:
        logs._GLOBAL_FIELDS.clear()
        logs._GLOBAL_FIELDS.update(saved)


def test_render_with_a_failure_and_with_fields_brought_by_values() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()  # type: ignore[no-untyped-call]
    event = _event("conn={conn} failed", {"conn": 3, "op": 1}, LogLevel.critical, "server.x",
                   1.5e9)
    event["log_failure"] = failure
    assert logs.render(event, "logfmt") == ref_render(event, "logfmt")
    fmt = "conn={conn} said {text}"
    for text in ("op=5", "nothing"):  # "op=" in the message only through a value
        event = _event(fmt, {"conn": 1, "text": text, "op": 9}, LogLevel.info, "server.l", 1e9)
        line = logs.render(event, "logfmt")
        assert line == ref_render(event, "logfmt")
        assert line.endswith(" op=9") is (text == "nothing")


def test_secrets_never_reach_the_line() -> None:
    event = _event("http request", {"key": "K", "private_key": "P", "body": "B",
                                    "Password": "W", "client": "c"}, LogLevel.info, "server.o",
                   1e9)
    line = logs.render(event, "logfmt")
    assert line.endswith(' msg="http request" client=c')


# --- buffering -------------------------------------------------------------------------------


class FakeReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.from_thread: list[Any] = []

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.from_thread.append((f, args, kw))


def info(observer: logs.LineObserver, text: str, level: Any = LogLevel.info,
         **extra: Any) -> None:
    observer(_event(text, extra, level, "server.test", 1e9))


@pytest.fixture
def reactor() -> FakeReactor:
    r = FakeReactor()
    r.running = True
    return r


def lines(path: Path) -> list[str]:
    """The messages written to path, in order."""
    if not path.exists():
        return []
    return [json.loads(re.search(r'msg=("(?:[^"\\]|\\.)*")', line).group(1))  # type: ignore[union-attr]
            for line in path.read_text().splitlines()]


def test_info_lines_wait_for_the_flush_timer(tmp_path: Path, reactor: FakeReactor) -> None:
    path = tmp_path / "a.log"
    observer = logs.LineObserver("logfmt", path=path, reactor=reactor)
    info(observer, "one")
    info(observer, "two")
    assert lines(path) == []
    assert len(reactor.getDelayedCalls()) == 1  # one timer per batch
    reactor.advance(logs.FLUSH_INTERVAL)
    assert lines(path) == ["one", "two"]
    info(observer, "three")
    assert lines(path) == ["one", "two"]
    reactor.advance(logs.FLUSH_INTERVAL)
    assert lines(path) == ["one", "two", "three"]


def test_warnings_errors_and_failures_flush_at_once_in_order(tmp_path: Path,
                                                            reactor: FakeReactor) -> None:
    path = tmp_path / "a.log"
    observer = logs.LineObserver("logfmt", path=path, reactor=reactor)
    info(observer, "one")
    info(observer, "warned", LogLevel.warn)
    assert lines(path) == ["one", "warned"]
    info(observer, "two")
    info(observer, "error", LogLevel.error)
    assert lines(path) == ["one", "warned", "two", "error"]
    info(observer, "three")
    try:
        raise RuntimeError("x")
    except RuntimeError:
        info(observer, "failed", log_failure=Failure())  # type: ignore[no-untyped-call]
    assert lines(path)[-2] == "three" and lines(path)[-1].startswith("failed\nTraceback")
    written = lines(path)
    reactor.advance(logs.FLUSH_INTERVAL)  # the timer of "three" finds nothing left to write
    assert lines(path) == written


def test_a_full_batch_is_written_at_once(tmp_path: Path, reactor: FakeReactor) -> None:
    path = tmp_path / "a.log"
    observer = logs.LineObserver("logfmt", path=path, reactor=reactor)
    for i in range(logs.MAX_PENDING):
        info(observer, f"l{i}")
    assert len(lines(path)) == logs.MAX_PENDING


def test_shutdown_and_exit_flush(tmp_path: Path, reactor: FakeReactor) -> None:
    path = tmp_path / "a.log"
    observer = logs.LineObserver("logfmt", path=path, reactor=reactor)
    info(observer, "one")
    (hook, args, kw), = reactor.triggers["after"]["shutdown"]
    hook(*args, **kw)
    assert lines(path) == ["one"]
    info(observer, "two")
    logs.flush_buffered()  # what atexit runs
    assert lines(path) == ["one", "two"]
    assert len(reactor.triggers["after"]["shutdown"]) == 1  # registered once


def test_reopen_sends_pending_lines_to_the_old_file(tmp_path: Path,
                                                    reactor: FakeReactor) -> None:
    path, rotated = tmp_path / "a.log", tmp_path / "a.log.1"
    observer = logs.LineObserver("logfmt", path=path, reactor=reactor)
    info(observer, "before")
    path.rename(rotated)
    observer.request_reopen()  # what SIGUSR1 does: nothing but a flag and a wake-up
    assert not path.exists()
    (f, args, kw), = reactor.from_thread
    f(*args, **kw)
    info(observer, "after")
    reactor.advance(logs.FLUSH_INTERVAL)
    assert lines(rotated) == ["before"] and lines(path) == ["after"]
    # Without a running reactor, the next line reopens first.
    reactor.running = False
    path.rename(tmp_path / "a.log.2")
    observer.request_reopen()
    info(observer, "later")
    assert lines(path) == ["later"] and lines(tmp_path / "a.log.2") == ["after"]


def test_unbuffered_without_a_running_reactor_or_off_the_main_thread(
        tmp_path: Path, reactor: FakeReactor) -> None:
    path = tmp_path / "a.log"
    observer = logs.LineObserver("logfmt", path=path, reactor=reactor)
    info(observer, "pending")
    thread = threading.Thread(target=info, args=(observer, "thread"))
    thread.start()
    thread.join()
    assert lines(path) == ["pending", "thread"]  # in order: the pending line went first
    reactor.running = False
    info(observer, "stopped")
    assert lines(path) == ["pending", "thread", "stopped"]


def test_level_filter_matches_twisted_predicate() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        ILogFilterPredicate,
        ILogObserver,
        LogLevelFilterPredicate,
    )

    for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
        ours: list[Any] = []
        theirs: list[Any] = []
        ours_filter = logs.LevelFilter(ours.append, level)
        theirs_filter = FilteringLogObserver(
            cast(ILogObserver, theirs.append),
            [cast(ILogFilterPredicate, LogLevelFilterPredicate(defaultLogLevel=level))])
        for event_level in (*LogLevel.iterconstants(), None):
            for namespace in ("server.x", "", None):
                event: dict[str, Any] = {"log_format": "x"}
                if event_level is not None:
                    event["log_level"] = event_level
                if namespace is not None:
                    event["log_namespace"] = namespace
                ours_filter(event)
                theirs_filter(event)
        assert ours == theirs


# --- a real server process: SIGUSR1 and SIGTERM lose nothing -----------------------------

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from twisted.internet import reactor
    from twisted.logger import Logger
    from server.logs import start_logging

    path = Path(sys.argv[1])
    start_logging("logfmt", "info", path)
    log = Logger(namespace="server.test")
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))

    def first():
        for i in range(100):
            log.info("before {i}", i=i)
        path.rename(str(path) + ".1")
        os.kill(os.getpid(), signal.SIGUSR1)
        reactor.callLater(0.01, second)

    def second():
        for i in range(100):
            log.info("after {i}", i=i)
        os.kill(os.getpid(), signal.SIGTERM)  # with info lines still pending

    reactor.callWhenRunning(first)
    reactor.run()
""")


def test_sigusr1_and_sigterm_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "serve.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=REPO, timeout=60,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert lines(Path(str(path) + ".1")) == [f"before {i}" for i in range(100)]
    assert [m for m in lines(path) if m.startswith("after")] == [f"after {i}" for i in range(100)]


# --- Twisted's own listener lines are not certpub's log ------------------------------------

NOISE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from twisted.python import log as legacy
    from server.logs import flush_buffered, start_logging

    start_logging("logfmt", "info", Path(sys.argv[1]))

    class LdapFactory(Factory):  # noisy, as Twisted's factories are by default
        pass

    def run():
        port = reactor.listenTCP(0, LdapFactory(), interface="127.0.0.1")
        legacy.msg("a legacy line that is not about a port")
        port.stopListening().addCallback(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    flush_buffered()
""")


def test_twisted_port_and_factory_lines_are_dropped(tmp_path: Path) -> None:
    """Friction (a) of issue 25: 'LdapFactory starting on 1389' and 'Starting factory
    <...LdapFactory object at 0x...>' (and their stop lines) no longer reach the log; other
    legacy lines still do. certpub logs one line per listener itself (server.app)."""
    path = tmp_path / "serve.log"
    proc = subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(path)], cwd=REPO,
                          timeout=60, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert "a legacy line that is not about a port" in text
    for noise in ("starting on", "Starting factory", "Stopping factory", "Port", "0x"):
        assert noise not in text, text
    assert logs.twisted_noise({"message": ("LdapFactory starting on 1389",)})
    assert not logs.twisted_noise({"message": ("LdapFactory starting on 1389", "x")})
    assert not logs.twisted_noise({"message": ("conn=7 starting on time",)})

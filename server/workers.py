"""``certpub serve --workers N``: N processes, each with its own reactor, on shared listening sockets.

Strategy: the parent parses the ``tcp:``/``tls:`` endpoint strings of ``[ldap]`` and ``[http]``,
binds each socket once (port 0 gets its real port here, logged), sets it non-blocking, imports
the service modules but never the reactor, then ``os.fork()``s: each child builds a fresh
reactor and runs ``server.serve.serve``, whose ``server.app`` adopts the inherited sockets
(``adoptStreamPort``, TLS-wrapped for ``tls:``) and opens its own store and change feed; on
Linux each worker has its own socket bound with SO_REUSEPORT to the same address (the kernel
spreads connections evenly; a shared socket lets whichever worker is in accept() take them),
elsewhere all workers share one socket. A socket stays open in the parent while its worker is
restarted, so connections queued on it wait for the new worker instead of being refused. Fork, not spawn: no re-import
per worker (a restart serves in a fraction of a second) and no fd passing. The parent is a
``select`` loop (signals via ``set_wakeup_fd``) that reaps with ``waitpid``, restarts a dead
worker (backoff doubling while it dies young), passes SIGHUP/SIGUSR1 on, and on SIGTERM/SIGINT
forwards SIGTERM, waits ``STOP_TIMEOUT``, then SIGKILLs. A worker writes ``ready`` (or why it
cannot start) to a pipe; ``MAX_START_FAILURES`` failed starts in a row stop everything (exit 1).
A worker never outlives its supervisor: on Linux it asks the kernel for SIGKILL when the parent
dies (``PR_SET_PDEATHSIG``), then checks that the parent it was forked from is still its parent,
which closes the race of a parent killed between ``fork()`` and the ``prctl()``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, cast

from twisted import logger as tlog
from twisted.logger import Logger

from server.config import Config, LogConfig, load_config
from server.configtools import ConfigError
from server.logs import LineObserver
from store.lifeline import die_with_parent

STOP_TIMEOUT = 15.0  # seconds between the forwarded SIGTERM and SIGKILL
MAX_START_FAILURES = 3  # failed starts in a row of one worker before the parent gives up
BACKOFF = 0.5  # first restart delay, doubled for each quick death in a row
MAX_BACKOFF = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long starts its backoff over
DEFAULT_BACKLOG = 50  # Twisted's default for tcp: endpoints
_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD)
EX_CONFIG = 78  # a worker's configuration error (serve() returns it): not retried


class SupervisorError(Exception):
    """The workers cannot be started or kept running; the message says why."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code  # the exit code of ``certpub serve``: 78 for a configuration error


@dataclass(frozen=True)
class Endpoint:
    """A ``tcp:`` or ``tls:`` listener as the parent binds it."""

    description: str
    tls: bool
    port: int
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.interface else socket.AF_INET


def _tokens(description: str) -> list[tuple[str | None, str]]:
    """Split a Twisted endpoint string into (key or None, value), honouring backslash escapes."""
    out: list[tuple[str | None, str]] = []
    key: str | None = None
    cur: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            cur.append(next(chars, "\\"))
        elif c == ":":
            out.append((key, "".join(cur)))
            key, cur = None, []
        elif c == "=" and key is None:
            key, cur = "".join(cur), []
        else:
            cur.append(c)
    out.append((key, "".join(cur)))
    return out


def parse_endpoint(description: str) -> Endpoint:
    """Parse ``tcp:PORT[:interface=ADDR][:backlog=N]`` (or ``tls:...``); ValueError otherwise."""
    (kind_key, kind), *args = _tokens(description)
    if kind_key is not None or kind not in ("tcp", "tls"):
        raise ValueError(f"{description!r}: only tcp: and tls: listeners can be shared by workers")
    names = ("port", "interface", "backlog")
    values: dict[str, str] = {}
    for i, (key, value) in enumerate(args):
        name = key if key is not None else (names[i] if i < len(names) else "")
        if name not in names:
            raise ValueError(f"{description!r}: unknown parameter {key or value!r}")
        if name in values:
            raise ValueError(f"{description!r}: {name} given twice")
        values[name] = value
    if "port" not in values:
        raise ValueError(f"{description!r}: no port")
    try:
        port, backlog = int(values["port"]), int(values.get("backlog", DEFAULT_BACKLOG))
    except ValueError:
        raise ValueError(f"{description!r}: port and backlog must be integers") from None
    if not 0 <= port <= 65535 or backlog < 1:
        raise ValueError(f"{description!r}: port must be 0-65535 and backlog at least 1")
    return Endpoint(description, kind == "tls", port, values.get("interface", ""), backlog)


def bind(endpoint: Endpoint, *, reuseport: bool = False, port: int | None = None) -> socket.socket:
    """A listening, non-blocking socket for endpoint (SO_REUSEADDR, as Twisted sets it).

    reuseport: set SO_REUSEPORT, so that other sockets bound the same way share the address
    and the kernel spreads new connections across them; port overrides the endpoint's (the
    real port the first socket got for ``port 0``).
    """
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((endpoint.interface, endpoint.port if port is None else port))
        sock.listen(endpoint.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SupervisorError(
            f"cannot listen on {endpoint.description}: {exc.strerror or exc}") from None
    return sock


def reuseport_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def resolve_workers(count: int) -> int:
    """The number of workers to run: count, or one per CPU when count is 0."""
    return count if count > 0 else (os.cpu_count() or 1)


def describe_status(status: int) -> str:
    """A waitpid status as ``exit:N`` or ``signal:SIGNAME``."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"signal:{signal.Signals(-code).name}"
    return f"exit:{code}"


def parent_logger(config: LogConfig) -> tuple[Logger, LineObserver]:
    """The parent's own logger and observer; the global Twisted log is left to the workers."""
    observer = LineObserver(config.format, path=config.file)
    level = tlog.LogLevelFilterPredicate(defaultLogLevel=tlog.LogLevel.levelWithName(config.level))
    filtered = tlog.FilteringLogObserver(cast(tlog.ILogObserver, observer),
                                         [cast(tlog.ILogFilterPredicate, level)])
    return Logger(namespace="server.workers", observer=cast(tlog.ILogObserver, filtered)), observer


@dataclass
class Worker:
    """One worker slot: its current process (pid 0: none) and its restart bookkeeping."""

    index: int
    pid: int = 0
    status_fd: int = -1
    buffer: bytes = b""
    ready: bool = False
    error: str = ""
    started: float = 0.0
    failures: int = 0  # failed starts in a row
    crashes: int = 0  # deaths in a row of a worker that lived less than STABLE_AFTER
    restart_at: float = 0.0


def run_worker(index: int, config: Config, config_path: Path,
               listeners: dict[str, socket.socket], status_fd: int) -> int:
    """The body of worker index (in the forked child): serve on the inherited sockets."""
    from server.logs import set_global_fields
    from server.metrics import set_worker
    from server.serve import serve

    set_global_fields(worker=index)
    set_worker(index)

    def started(error: str | None) -> None:
        line = "ready" if error is None else "error " + " ".join(error.split())[:2000]
        with contextlib.suppress(OSError):
            os.write(status_fd, (line + "\n").encode("utf-8", "replace"))

    return serve(config, config_path, inherited=listeners, on_started=started)


class Supervisor:
    """The parent: forks, watches, restarts and stops the workers."""

    def __init__(self, config: Config, config_path: Path, count: int,
                 listeners: list[Listeners], log: Logger, observer: LineObserver,
                 metrics_dir: Path | None = None) -> None:
        self.config, self.config_path, self.listeners = config, config_path, listeners
        self.metrics_dir = metrics_dir  # the workers' shared metric files
        self.log, self.observer = log, observer
        self.workers = [Worker(i) for i in range(1, count + 1)]
        self.signals: list[int] = []
        self.stopping = self.killed = self.all_ready = False
        self.deadline = 0.0
        self.failure: str | None = None
        self.failure_code = 1
        self._wake = (-1, -1)

    def run(self) -> int:
        """Start every worker and supervise until stopped; 0 after a clean stop."""
        wake_r, wake_w = self._wake = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            for worker in self.workers:
                self._spawn(worker)
            self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)
        if self.failure is not None:
            raise SupervisorError(self.failure, self.failure_code)
        self.log.info("all workers stopped", clean=not self.killed)
        return 1 if self.killed else 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _loop(self) -> None:
        while True:
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            alive = [w for w in self.workers if w.pid]
            if self.stopping:
                if not alive:
                    return
                if now >= self.deadline:
                    self._kill(alive)
            else:
                for worker in self.workers:
                    if not worker.pid and worker.restart_at <= now:
                        self._spawn(worker)
            self._wait(self._timeout(now))

    def _timeout(self, now: float) -> float:
        due = [self.deadline] if self.stopping else [w.restart_at for w in self.workers if not w.pid]
        return max(0.0, min([1.0, *(t - now for t in due)]))

    def _wait(self, timeout: float) -> None:
        wake_r = self._wake[0]
        fds = [wake_r] + [w.status_fd for w in self.workers if w.status_fd >= 0]
        readable, _, _ = select.select(fds, [], [], timeout)
        for fd in readable:
            if fd == wake_r:
                while _read(wake_r):
                    pass
            else:
                self._read_status(next(w for w in self.workers if w.status_fd == fd))

    def _spawn(self, worker: Worker) -> None:
        status_r, status_w = os.pipe()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        parent = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:
                self._child(worker, status_r, status_w, mask, parent)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(status_w)
        os.set_blocking(status_r, False)
        worker.pid, worker.status_fd, worker.buffer = pid, status_r, b""
        worker.ready, worker.error, worker.started = False, "", time.monotonic()
        self.log.info("worker {worker} started", worker=worker.index, pid=pid)

    def _child(self, worker: Worker, status_r: int, status_w: int, mask: set[int],
               parent: int) -> NoReturn:
        code = 70  # EX_SOFTWARE: a bug before serve() returned
        try:
            die_with_parent(parent)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in (signal.SIGHUP, signal.SIGUSR1):  # until serve() installs its handlers
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (status_r, *self._wake, *(w.status_fd for w in self.workers)):
                if fd >= 0:
                    os.close(fd)
            own = self.listeners[worker.index - 1]
            for listeners in self.listeners:  # other workers' SO_REUSEPORT sockets
                for description, sock in listeners.items():
                    if sock is not own[description]:
                        sock.close()
            code = run_worker(worker.index, self.config, self.config_path,
                              self.listeners[worker.index - 1], status_w)
        except BaseException:  # noqa: BLE001 - the child must reach os._exit, whatever happened
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)

    def _read_status(self, worker: Worker) -> None:
        while worker.status_fd >= 0:
            data = _read(worker.status_fd)
            if data is None:
                return
            if not data:
                os.close(worker.status_fd)
                worker.status_fd = -1
                return
            worker.buffer += data
            *lines, worker.buffer = worker.buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if line == "ready":
                    worker.ready, worker.failures = True, 0
                    self.log.info("worker {worker} ready", worker=worker.index, pid=worker.pid)
                elif line.startswith("error "):
                    worker.error = line[6:]
            if not self.all_ready and all(w.ready for w in self.workers):
                self.all_ready = True
                self.log.info("all {workers} workers ready", workers=len(self.workers),
                              pid=os.getpid())

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self._read_status(worker)  # the last words: "ready" or why not
                if worker.status_fd >= 0:
                    os.close(worker.status_fd)
                    worker.status_fd = -1
                self._exited(worker, describe_status(status))

    def _exited(self, worker: Worker, how: str) -> None:
        pid, lived, worker.pid = worker.pid, time.monotonic() - worker.started, 0
        if self.metrics_dir is not None:  # its live gauges go, its counters stay
            from server.metrics import process_dead

            process_dead(pid, self.metrics_dir)
        if self.stopping:
            self.log.info("worker {worker} stopped", worker=worker.index, pid=pid, status=how)
            return
        if not worker.ready:
            worker.failures += 1
            reason = worker.error or how
            if how == f"exit:{EX_CONFIG}":
                # A key the service user cannot read, a refused signer: a restart cannot fix
                # it, and systemd's RestartPreventExitStatus=78 must see 78.
                self.failure, self.failure_code = f"worker {worker.index}: {reason}", EX_CONFIG
                self.log.error("{reason}; stopping", reason=self.failure, pid=pid, status=how)
                self._stop()
                return
            if worker.failures >= MAX_START_FAILURES:
                self.failure = f"worker {worker.index} failed to start {worker.failures} times: {reason}"
                self.log.error("{reason}; stopping", reason=self.failure, pid=pid, status=how)
                self._stop()
                return
            delay = BACKOFF * 2 ** (worker.failures - 1)
            self.log.warn("worker {worker} could not start: {reason}; retrying in {delay}s",
                          worker=worker.index, pid=pid, status=how, reason=reason, delay=delay)
        else:
            worker.crashes = worker.crashes + 1 if lived < STABLE_AFTER else 1
            delay = min(MAX_BACKOFF, BACKOFF * 2 ** (worker.crashes - 1))
            self.log.warn("worker {worker} died; restarting in {delay}s", worker=worker.index,
                          pid=pid, status=how, delay=delay)
        worker.restart_at = time.monotonic() + delay

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self.log.info("stopping on {signal}: SIGTERM to the workers",
                              signal=signal.Signals(sig).name)
                self._stop()
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig == signal.SIGUSR1 and self.config.log.file is not None:
                self.observer.reopen()
                self._forward(signal.SIGUSR1)

    def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.log.error("reload refused, keeping the running configuration: {error}",
                           error=str(exc))
        else:
            old = self.config
            if ((new.ldap.listen, new.http.listen, new.ops.listen)
                    != (old.ldap.listen, old.http.listen, old.ops.listen)):
                self.log.warn("listeners change only on restart; keeping the bound sockets")
            self.config = replace(new, ldap=replace(new.ldap, listen=old.ldap.listen),
                                  http=replace(new.http, listen=old.http.listen),
                                  ops=replace(new.ops, listen=old.ops.listen))
        count = self._forward(signal.SIGHUP)
        self.log.info("SIGHUP passed to {count} workers", count=count)

    def _forward(self, sig: int) -> int:
        pids = [w.pid for w in self.workers if w.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)

    def _stop(self) -> None:
        self.stopping = True
        self.deadline = time.monotonic() + STOP_TIMEOUT
        self._forward(signal.SIGTERM)

    def _kill(self, alive: list[Worker]) -> None:
        self.log.warn("{count} workers still running after {timeout}s: SIGKILL",
                      count=len(alive), timeout=STOP_TIMEOUT)
        self.killed = True
        self.deadline = float("inf")
        self._forward(signal.SIGKILL)


def _read(fd: int) -> bytes | None:
    """Bytes from a non-blocking fd: b"" at EOF, None when nothing is there now."""
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return None


Listeners = dict[str, socket.socket]


def bind_listeners(config: Config, log: Logger, count: int = 1) -> list[Listeners]:
    """Bind every configured listener, by endpoint string; logs each real address.

    Returns one {description: socket} map per worker. With several workers on Linux, each
    worker gets its own socket bound with SO_REUSEPORT to the same address, and the kernel
    spreads connections evenly across them; one socket shared by all workers would let the
    busiest worker (the one that happens to be in accept()) take most of them.
    """
    reuse = count > 1 and reuseport_available()
    per_worker: list[Listeners] = [{} for _ in range(count if reuse else 1)]
    try:
        for service, descriptions in (("ldap", config.ldap.listen), ("http", config.http.listen),
                                      ("ops", config.ops.listen)):
            for description in descriptions:
                if description in per_worker[0]:
                    raise SupervisorError(f"listener {description!r} is configured twice")
                try:
                    endpoint = parse_endpoint(description)
                except ValueError as exc:
                    raise SupervisorError(f"listener {exc}; run with --workers 1") from None
                first = per_worker[0][description] = bind(endpoint, reuseport=reuse)
                host, port = first.getsockname()[:2]
                for listeners in per_worker[1:]:
                    listeners[description] = bind(endpoint, reuseport=True, port=port)
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                log.info("{service} listening on {listener}", service=service.upper(),
                         listener=description, address=address,
                         sockets=len(per_worker) if reuse else 1)
    except BaseException:
        _close_all(per_worker)
        raise
    if not reuse:
        per_worker = per_worker * count  # every worker adopts the same sockets
    return per_worker


def _close_all(per_worker: list[Listeners]) -> None:
    for listeners in per_worker:
        for sock in listeners.values():
            sock.close()


def preload() -> None:
    """Import the services once in the parent (faster worker starts, shared pages), not the reactor."""
    for name in ("twisted.internet.ssl", "twisted.protocols.tls", "server.app",
                 "server.ldap.server", "server.http.site"):
        importlib.import_module(name)
    if "twisted.internet.reactor" in sys.modules:
        raise SupervisorError("workers must be forked before the Twisted reactor is imported")


METRICS_PREFIX = "certpub-metrics-"


def metrics_base() -> Path:
    """Where the shared metrics directory is made: systemd's ``RuntimeDirectory=`` (a tmpfs
    only the service user reads, removed when the service stops), else the temp folder."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) if runtime else Path(tempfile.gettempdir())


def make_metrics_dir(base: Path) -> Path:
    """A fresh, owner-only ``certpub-metrics-<pid>`` under base for this run's metric files;
    directories left by supervisors that are gone (killed: no clean-up ran) are removed."""
    for old in base.glob(METRICS_PREFIX + "*"):
        try:
            pid = int(old.name[len(METRICS_PREFIX):])
        except ValueError:
            continue
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # another running supervisor's
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(old, ignore_errors=True)
    path = base / f"{METRICS_PREFIX}{os.getpid()}"
    path.mkdir(mode=0o700)
    return path


def supervise(config: Config, config_path: Path, count: int) -> int:
    """Bind, fork count workers and supervise them; the exit code of ``certpub serve``."""
    from server.metrics import enable_multiprocess

    log, observer = parent_logger(config.log)
    try:
        metrics_dir = make_metrics_dir(metrics_base())
    except OSError as exc:
        raise SupervisorError(f"cannot make the metrics directory: {exc}") from None
    try:
        enable_multiprocess(metrics_dir)  # before the service modules make any metric
        preload()
        listeners = bind_listeners(config, log, count)
        log.info("starting {workers} workers", workers=count, pid=os.getpid(),
                 metrics=str(metrics_dir))
        try:
            return Supervisor(config, config_path, count, listeners, log, observer,
                              metrics_dir).run()
        finally:
            _close_all(listeners)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)

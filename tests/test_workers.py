"""``certpub serve --workers N``: endpoint parsing, and a real supervisor with real clients."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from server.workers import (
    Endpoint,
    describe_status,
    parse_endpoint,
    resolve_workers,
    reuseport_available,
)
from tests.conftest import require_tool

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


# --- endpoint strings ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("tcp:389", Endpoint("tcp:389", False, 389)),
    ("tcp:0:interface=127.0.0.1", Endpoint("tcp:0:interface=127.0.0.1", False, 0, "127.0.0.1")),
    ("tls:636:interface=127.0.0.1:backlog=128",
     Endpoint("tls:636:interface=127.0.0.1:backlog=128", True, 636, "127.0.0.1", 128)),
    ("tcp:port=80:backlog=5", Endpoint("tcp:port=80:backlog=5", False, 80, "", 5)),
    ("tcp:80:10.0.0.1:7", Endpoint("tcp:80:10.0.0.1:7", False, 80, "10.0.0.1", 7)),
    (r"tcp:389:interface=\:\:1", Endpoint(r"tcp:389:interface=\:\:1", False, 389, "::1")),
])
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


def test_endpoint_family() -> None:
    assert parse_endpoint("tcp:1").family == socket.AF_INET
    assert parse_endpoint(r"tls:1:interface=\:\:").family == socket.AF_INET6


@pytest.mark.parametrize(("text", "words"), [
    ("unix:/run/x.sock", "only tcp: and tls:"),
    ("ssl:443", "only tcp: and tls:"),
    ("tcp6:389", "only tcp: and tls:"),
    ("tcp:interface=127.0.0.1", "no port"),
    ("tcp:http", "integers"),
    ("tcp:70000", "0-65535"),
    ("tcp:389:backlog=0", "backlog at least 1"),
    ("tcp:389:reuse=1", "unknown parameter 'reuse'"),
    ("tcp:389:port=390", "port given twice"),
])
def test_parse_endpoint_refuses(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_endpoint(text)


def test_resolve_workers_and_status() -> None:
    assert resolve_workers(3) == 3
    assert resolve_workers(0) == (os.cpu_count() or 1)
    assert describe_status(0) == "exit:0" and describe_status(1 << 8) == "exit:1"
    assert describe_status(signal.SIGKILL) == "signal:SIGKILL"


# --- a real supervisor --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fields(line: str) -> dict[str, str]:
    return {k: v[1:-1] if v.startswith('"') else v for k, v in FIELD.findall(line)}


class Server:
    """``certpub serve`` as a subprocess; a thread collects its log lines."""

    def __init__(self, config: Path, workers: int = 2) -> None:
        # A session of its own: the teardown can kill the supervisor and its workers as a group.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--workers", str(workers),
             "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.done = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for(self, match: Callable[[dict[str, str]], bool], since: int = 0,
                 timeout: float = 15.0) -> dict[str, str]:
        """The first log line after index since whose fields satisfy match."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    if match(f := fields(line)):
                        return f
                left = end - time.monotonic()
                if left <= 0 or self.done:
                    raise AssertionError("no such log line; log:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.5))

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def ready_pid(self, worker: int, since: int = 0) -> int:
        f = self.wait_for(lambda f: f.get("msg") == f"worker {worker} ready", since)
        return int(f["pid"])

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 20 s) to the supervisor, then SIGKILL to whatever of its
        process group is left: no worker survives a test, whatever the test did."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from server.config import load_config
    from server.demo.pki import build_demo_pki
    from importer.run import import_openssl, import_paths

    now = datetime.now(UTC).replace(microsecond=0)
    pki = build_demo_pki(tmp_path_factory.mktemp("workers"), now=now, ldap_port=free_port(),
                         http_port=free_port(), subscribers_per_ca=15)
    config = load_config(pki.config_path)
    import_openssl(config, now=lambda: datetime.now(UTC), progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path is not None],
                 now=lambda: datetime.now(UTC), progress=None)
    return pki


def with_ports(pki: Any, tmp_path: Path, **replace: str) -> tuple[Path, int, int]:
    """A copy of the demo configuration on fresh ports (and other text replaced)."""
    ldap_port, http_port = free_port(), free_port()
    text = re.sub(r'\[ldap\]\nlisten = \["tcp:\d+', f'[ldap]\nlisten = ["tcp:{ldap_port}',
                  pki.config_path.read_text())
    text = re.sub(r'\[http\]\nlisten = \["tcp:\d+', f'[http]\nlisten = ["tcp:{http_port}', text)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "certpub.toml"
    path.write_text(text)
    return path, ldap_port, http_port


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])


@pytest.fixture
def server(pki: Any, tmp_path: Path) -> Iterator[tuple[Server, int, int]]:
    config, ldap_port, http_port = with_ports(pki, tmp_path)
    srv = Server(config)
    try:
        yield srv, ldap_port, http_port
    finally:
        srv.stop()


@pytest.mark.realclient
def test_workers_serve_restart_reload_stop(server: tuple[Server, int, int], pki: Any) -> None:
    ldapsearch, openssl = require_tool("ldapsearch"), require_tool("openssl")
    srv, ldap_port, http_port = server
    good = next(c for c in pki.certs if c.state == "good" and c.emails and c.ca == "rsa-ca")

    def serving() -> None:
        r = subprocess.run(
            [ldapsearch, "-x", "-LLL", "-o", "ldif-wrap=no", "-H", f"ldap://127.0.0.1:{ldap_port}",
             "-b", "c=MO", f"(mail={good.emails[0]})", "userCertificate;binary"],
            check=False, capture_output=True, text=True, timeout=20,
            env=dict(os.environ, LDAPNOINIT="1"))
        assert r.returncode == 0 and "userCertificate;binary::" in r.stdout, r.stderr
        r = subprocess.run(
            [openssl, "ocsp", "-issuer", str(pki.cas["rsa-ca"].cert_path), "-cert", str(good.path),
             "-CAfile", str(pki.cas["root"].cert_path), "-url", f"http://127.0.0.1:{http_port}/ocsp"],
            check=False, capture_output=True, text=True, timeout=20)
        assert "Response verify OK" in r.stderr and f"{good.path}: good" in r.stdout, r.stderr

    srv.wait_for(lambda f: f.get("msg") == "all 2 workers ready")
    pids = {n: srv.ready_pid(n) for n in (1, 2)}
    assert all(alive(p) and parent_of(p) == srv.proc.pid for p in pids.values())
    for n in (1, 2):  # each worker logs its own start-up summary (info lines are batched)
        srv.wait_for(lambda f, n=n: f.get("system") == "app"  # type: ignore[misc]
                     and f.get("msg", "").startswith("certpub ") and f.get("worker") == str(n))
    for _ in range(3):
        serving()

    mark = srv.mark()  # a worker killed: the other one serves; it is restarted
    os.kill(pids[1], signal.SIGKILL)
    died = srv.wait_for(lambda f: f.get("msg", "").startswith("worker 1 died"), mark)
    assert died["pid"] == str(pids[1]) and died["status"] == "signal:SIGKILL"
    serving()
    pids[1] = srv.ready_pid(1, mark)
    assert alive(pids[1]) and pids[1] != int(died["pid"]) and alive(pids[2])
    serving()

    mark = srv.mark()  # SIGHUP: each worker reloads, none is replaced
    srv.proc.send_signal(signal.SIGHUP)
    for n in (1, 2):
        srv.wait_for(lambda f, n=n: f.get("msg", "").startswith("configuration reloaded")  # type: ignore[misc]
                     and f.get("worker") == str(n), mark)
    assert all(alive(p) for p in pids.values())
    serving()

    srv.proc.send_signal(signal.SIGTERM)  # a clean stop: exit 0, no worker left
    assert srv.proc.wait(20) == 0, "\n".join(srv.lines)
    assert not any(alive(p) for p in pids.values())
    assert any("all workers stopped" in line for line in srv.lines)


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (a bind succeeds; SO_REUSEADDR skips TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_workers_die_with_a_killed_supervisor(server: tuple[Server, int, int]) -> None:
    """kill -9 of the supervisor: every worker is gone and both ports are free within 2 s."""
    srv, ldap_port, http_port = server
    srv.wait_for(lambda f: f.get("msg") == "all 2 workers ready")
    pids = [srv.ready_pid(n) for n in (1, 2)]
    assert not port_free(ldap_port) and not port_free(http_port)
    srv.proc.kill()
    srv.proc.wait(5)
    killed = time.monotonic()
    while time.monotonic() - killed < 2.0:
        if not any(alive(p) for p in pids) and port_free(ldap_port) and port_free(http_port):
            break
        time.sleep(0.02)
    assert [p for p in pids if alive(p)] == [], "workers outlived their supervisor"
    assert port_free(ldap_port) and port_free(http_port)


def test_worker_forked_from_a_dead_parent_exits() -> None:
    """The race at fork: a worker whose parent is not the supervisor any more exits at once."""
    code = ("from store.lifeline import die_with_parent\n"
            "die_with_parent(1)\n"  # pretend the supervisor was pid 1: it is not our parent
            "print('still running')\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 75 and "still running" not in r.stdout, r.stdout + r.stderr


def serve_two_workers(pki: Any, tmp_path: Path,
                      replace: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """certpub serve --workers 2 on the demo configuration with text replaced, to its end."""
    config, _, _ = with_ports(pki, tmp_path, **replace)
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--workers", "2",
                           "--config", str(config)], check=False, capture_output=True, text=True,
                          timeout=25)


def test_worker_that_cannot_start_stops_the_parent(pki: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    store = str(pki.root / "store" / "store.sqlite3")
    started = time.monotonic()
    r = serve_two_workers(pki, tmp_path, {store: str(blocker / "store.sqlite3")})
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.fullmatch(r"certpub: worker \d failed to start 3 times: .*not-a-folder.*\n",
                        r.stderr), r.stderr
    assert time.monotonic() - started < 20
    assert r.stdout.count("could not start") >= 2


def test_worker_configuration_error_exits_78_without_retrying(pki: Any, tmp_path: Path) -> None:
    # A signer key a worker cannot load (the packaging tests cover one the certpub user cannot
    # read; root reads any file, so here it is one that is no key) is found when the worker
    # starts; a restart cannot fix it, so serve exits 78 at once, as systemd's
    # RestartPreventExitStatus=78 and the Debian package's notes expect.
    key = str(pki.cas["rsa-ca"].ocsp_key_path)
    unreadable = tmp_path / "ocsp.key"
    unreadable.write_text("not a key\n")
    unreadable.chmod(0o600)
    r = serve_two_workers(pki, tmp_path, {key: str(unreadable)})
    assert r.returncode == 78, r.stdout + r.stderr
    assert re.fullmatch(rf"certpub: worker \d: ca\[1\]\.ocsp\.signer_key: .*{unreadable}.*\n",
                        r.stderr), r.stderr
    assert "could not start" not in r.stdout


def test_workers_option_is_checked(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--workers", "-1"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers/-w: must be from 0 to" in r.stderr


def established_sockets(pid: int) -> set[str]:
    """Socket inodes a process holds open (listening ones included)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:"):
                out.add(target)
    return out


@pytest.mark.skipif(not reuseport_available(), reason="SO_REUSEPORT is Linux-only")
def test_connections_spread_over_workers(server: tuple[Server, int, int]) -> None:
    """Each worker has its own SO_REUSEPORT socket: 40 connections reach both workers."""
    srv, ldap_port, _ = server
    srv.wait_for(lambda f: f.get("msg") == "all 2 workers ready")
    pids = [srv.ready_pid(n) for n in (1, 2)]
    before = {pid: established_sockets(pid) for pid in pids}
    assert before[pids[0]] != before[pids[1]]  # each holds its own listening sockets only
    clients = []
    try:
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", ldap_port), timeout=10)
            # An anonymous bind answered proves a worker accepted this connection.
            c.sendall(bytes.fromhex("300c020101600702010304008000"))
            assert c.recv(64)[:1] == b"\x30"
            clients.append(c)
        gained = {pid: len(established_sockets(pid) - before[pid]) for pid in pids}
        assert sum(gained.values()) >= 40, gained
        assert all(n > 0 for n in gained.values()), gained
    finally:
        for c in clients:
            c.close()


# --- one /metrics for all workers -----------------------------------------------------------

def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:  # urllib opens a new connection per request (Connection: close)
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scraped(port: int, family: str, **labels: str) -> float:
    """The sum of family's samples whose labels include labels, in one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    total = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == family and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def settled(port: int, family: str, expected: float, seen: list[float], **labels: str) -> None:
    """Scrape until family reaches expected: every read is recorded (never above expected,
    never below an earlier read). Other workers fold their counts every few milliseconds
    (server.metrics FLUSH_DELAY), so a scrape may briefly trail the requests just answered."""
    for _ in range(200):
        value = scraped(port, family, **labels)
        assert value <= expected and (not seen or value >= seen[-1]), (seen, value, expected)
        seen.append(value)
        if value == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"{family} stayed at {seen[-1]}, expected {expected}")


@pytest.fixture
def ops_server(pki: Any, tmp_path: Path) -> Iterator[tuple[Server, int, int]]:
    config, _, http_port = with_ports(pki, tmp_path)
    ops_port = free_port()
    config.write_text(config.read_text()
                      + f'\n[ops]\nlisten = ["tcp:{ops_port}:interface=127.0.0.1"]\n')
    srv = Server(config)
    try:
        yield srv, http_port, ops_port
    finally:
        srv.stop()


def test_one_metrics_for_all_workers_kept_across_kill_and_reload(
        ops_server: tuple[Server, int, int]) -> None:
    """--workers 2: requests on their own connections reach both workers; every scrape (on
    the ops port, whichever worker takes it) shows all of them, and a counter never drops:
    not when a worker is killed and restarted, not on SIGHUP. The public port refuses it."""
    srv, http_port, ops_port = ops_server
    srv.wait_for(lambda f: f.get("msg") == "all 2 workers ready")
    pids = {n: srv.ready_pid(n) for n in (1, 2)}
    family, labels = "certpub_requests_total", {"protocol": "http", "operation": "ca"}
    seen: list[float] = []
    answered = 0

    def batch(n: int = 25) -> None:
        nonlocal answered
        for _ in range(n):
            status, body = _get(f"http://127.0.0.1:{http_port}/ca/rsa-ca.pem")
            assert status == 200 and body.startswith(b"-----BEGIN CERTIFICATE-----")
            answered += 1
        settled(ops_port, family, answered, seen, **labels)

    for _ in range(4):
        batch()
    assert _get(f"http://127.0.0.1:{http_port}/metrics")[0] == 404
    assert _get(f"http://127.0.0.1:{http_port}/healthz")[0] == 404
    assert _get(f"http://127.0.0.1:{ops_port}/healthz")[0] == 200
    # per-worker series carry the worker slot; summed ones do not
    status, body = _get(f"http://127.0.0.1:{ops_port}/metrics")
    assert b'process_resident_memory_bytes{worker="1"}' in body
    assert b'process_resident_memory_bytes{worker="2"}' in body
    assert b'certpub_open_connections{service="http"}' in body

    mark = srv.mark()  # a worker killed: its counts are kept, the total does not drop
    os.kill(pids[1], signal.SIGKILL)
    srv.wait_for(lambda f: f.get("msg", "").startswith("worker 1 died"), mark)
    settled(ops_port, family, answered, seen, **labels)
    pids[1] = srv.ready_pid(1, mark)
    batch()

    mark = srv.mark()  # SIGHUP: every worker reloads, nothing drops
    srv.proc.send_signal(signal.SIGHUP)
    for n in (1, 2):
        srv.wait_for(lambda f, n=n: f.get("msg", "").startswith("configuration reloaded")  # type: ignore[misc]
                     and f.get("worker") == str(n), mark)
    settled(ops_port, family, answered, seen, **labels)
    batch()
    assert seen == sorted(seen) and seen[-1] == answered == 150


def test_metrics_dir_is_fresh_and_stale_ones_are_removed(tmp_path: Path) -> None:
    from server.workers import METRICS_PREFIX, make_metrics_dir

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = tmp_path / f"{METRICS_PREFIX}{dead.pid}"  # a supervisor killed with -9
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"x")
    running = tmp_path / f"{METRICS_PREFIX}{os.getppid()}"  # another supervisor, alive
    running.mkdir()
    other = tmp_path / "certpub-metrics-notapid"
    other.mkdir()
    path = make_metrics_dir(tmp_path)
    assert path == tmp_path / f"{METRICS_PREFIX}{os.getpid()}"
    assert path.is_dir() and not any(path.iterdir()) and path.stat().st_mode & 0o777 == 0o700
    assert not stale.exists() and running.is_dir() and other.is_dir()

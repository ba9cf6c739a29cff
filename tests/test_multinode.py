"""Two ``certpub serve`` processes over one PostgreSQL database, and a writer: issue #8.

Strategy: the session's demo PKI is imported into a fresh database; two single-worker nodes,
each on its own LDAP and HTTP ports, serve it. Test A imports a CRL that revokes one more
certificate once (``certpub import``) and times how long each node takes to answer
``revoked`` (OCSP without a nonce, the cached path, and LDAP ``certpubStatus``) from the
commit, which a LISTEN on the store's channel observes. Test B stops PostgreSQL under traffic:
answers turn into ``tryLater`` / LDAP busy-unavailable / ``/healthz`` 503, a revoked
certificate is never answered ``good``, and both nodes heal when the database is back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from tests.conftest import REQUIRE_CLIENTS, import_demo_store
from tests.ocsp.helpers import ocsp_fetch
from tests.test_workers import Server, free_port

pytestmark = pytest.mark.realclient

PROPAGATION_BOUND = 1.0  # seconds from the import's commit to every node answering (issue #8)
RECOVERY_BOUND = 60.0  # generous: reconnect back-off, LISTEN retry, feed tick
POLL = 0.02
GOOD, REVOKED = ocsp.OCSPCertStatus.GOOD, ocsp.OCSPCertStatus.REVOKED


# --- clients ------------------------------------------------------------------------------

def ocsp_request(cert: Any, issuer: x509.Certificate, *, nonce: bool = False) -> bytes:
    """A DER OCSPRequest; without a nonce the responder may answer it from its cache."""
    b = ocsp.OCSPRequestBuilder().add_certificate(cert.load(), issuer, hashes.SHA1())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return b.build().public_bytes(Encoding.DER)


fetch = ocsp_fetch


def ocsp_status(port: int, der: bytes) -> str:
    """good | revoked | unknown, or the response status (tryLater, …) when not successful."""
    code, body = fetch(port, "POST", "/ocsp", der)
    assert code == 200, code
    resp = ocsp.load_der_ocsp_response(body)
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return resp.response_status.name.lower()  # "try_later", "internal_error", …
    return resp.certificate_status.name.lower()


def ldap_status(port: int, cert: Any) -> str | int:
    """certpubStatus of a certificate's entry, or the LDAP result code of a failed search."""
    import ldap3

    server = ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, auto_bind=True, receive_timeout=10)
    try:
        conn.search("c=MO", f"(&(certpubSerialNumber={cert.serial:x})(certpubCA={cert.ca}))",
                    attributes=["certpubStatus"])
        if conn.result["result"] != 0:
            return int(conn.result["result"])
        values = [e["raw_attributes"]["certpubStatus"] for e in conn.response
                  if e.get("type") == "searchResEntry"]
        assert len(values) == 1, conn.response
        return str(values[0][0].decode())
    finally:
        conn.unbind()


def ldap_uncached(port: int, counter: int) -> int:
    """The result code of a search that must reach the store (a mail never seen before)."""
    import ldap3

    server = ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, auto_bind=True, receive_timeout=10)
    try:
        conn.search("c=MO", f"(mail=nobody{counter}@example.invalid)", attributes=["cn"])
        return int(conn.result["result"])
    finally:
        conn.unbind()


def health(port: int) -> int:
    return fetch(port, "GET", "/healthz")[0]


def wait_until(check: Any, timeout: float, what: str) -> float:
    """Poll check() every POLL seconds until it is true; the seconds it took."""
    start = time.monotonic()
    last: Any = None
    while time.monotonic() - start < timeout:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - a node may refuse while it heals
            last = exc
        if last is True:
            return time.monotonic() - start
        time.sleep(POLL)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


# --- the cluster of nodes ------------------------------------------------------------------

@dataclasses.dataclass
class Node:
    server: Server
    ldap: int
    http: int


def node_config(demo_pki: Any, folder: Path, url: str) -> tuple[Path, int, int]:
    """The demo configuration on fresh ports, reading and writing the PostgreSQL store."""
    folder.mkdir(parents=True, exist_ok=True)
    ldap_port, http_port = free_port(), free_port()
    text = demo_pki.config_path.read_text()
    text = re.sub(r'\[ldap\]\nlisten = \["tcp:\d+', f'[ldap]\nlisten = ["tcp:{ldap_port}', text)
    text = re.sub(r'\[http\]\nlisten = \["tcp:\d+', f'[http]\nlisten = ["tcp:{http_port}', text)
    text, n = re.subn(r"\[store\]\npath = .*\n", f'[store]\nurl = "{url}"\nthreads = 2\n', text)
    assert n == 1
    text += '\n[ops]\npublic_networks = ["127.0.0.0/8"]\n'  # /healthz on the public port
    path = folder / "certpub.toml"
    path.write_text(text)
    return path, ldap_port, http_port


@pytest.fixture
def nodes(demo_pki: Any, demo_now: datetime, pg_url: str,
          tmp_path: Path) -> Iterator[tuple[list[Node], Path]]:
    """Two serving nodes over the demo PKI in pg_url; the config a writer may use."""
    try:
        import ldap3  # noqa: F401
    except ImportError:
        if REQUIRE_CLIENTS:
            pytest.fail("ldap3 is not installed (CERTPUB_REQUIRE_CLIENTS=1 forbids skipping)")
        pytest.skip("ldap3 is not installed")
    import_demo_store(demo_pki, pg_url, demo_now)
    started: list[Node] = []
    try:
        for n in (1, 2):
            config, ldap_port, http_port = node_config(demo_pki, tmp_path / f"node{n}", pg_url)
            started.append(Node(Server(config, workers=1), ldap_port, http_port))
        for node in started:
            try:
                wait_until(lambda node=node: node.server.done or health(node.http) == 200, 60,
                           "node ready")
                assert not node.server.done, "node exited"
            except AssertionError as exc:
                time.sleep(0.5)  # let the reader thread collect the last lines
                raise AssertionError(f"{exc}; log:\n" + "\n".join(node.server.lines)) from None
        yield started, config
    finally:
        for node in started:
            if node.server.proc.poll() is None:
                node.server.proc.terminate()
        for node in started:
            try:
                node.server.proc.wait(20)
            except subprocess.TimeoutExpired:
                node.server.proc.kill()
                node.server.proc.wait(10)


def cert_of(demo_pki: Any, ca: str, serial: int) -> Any:
    return next(c for c in demo_pki.certs if c.ca == ca and c.serial == serial)


# --- A: one import, every node answers revoked within a second of its commit ---------------

def test_revocation_reaches_every_node_within_a_second(
        nodes: tuple[list[Node], Path], demo_pki: Any, pg_url: str, tmp_path: Path) -> None:
    from store import open_store

    servers, config = nodes
    ca = demo_pki.cas["rsa-ca"]
    issuer = ca.load_certificate()
    target = cert_of(demo_pki, "rsa-ca", demo_pki.crl2_revokes["rsa-ca"])
    assert target.state == "good"
    der = ocsp_request(target, issuer)
    for node in servers:  # good, twice: the second answer comes from the node's cache
        assert ocsp_status(node.http, der) == "good"
        assert ocsp_status(node.http, der) == "good"
        assert ldap_status(node.ldap, target) == "valid"

    crl = tmp_path / "crl-2.pem"
    shutil.copyfile(ca.crl2_path, crl)
    watcher = open_store(pg_url, create=False, migrate=False)
    before = int(watcher.generation())
    watcher.wait_for_change(0)  # LISTEN before the write starts
    announced: list[tuple[float, int]] = []  # (when heard, generation read just after)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if watcher.wait_for_change(0.1):
                heard = time.monotonic()  # before the read: errs towards an earlier commit
                announced.append((heard, int(watcher.generation())))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    pending = {(i, kind) for i in range(len(servers)) for kind in ("ocsp", "ldap")}
    first_revoked: dict[tuple[int, str], float] = {}
    proc: subprocess.Popen[str] | None = None
    try:
        # the nodes are polled while the import runs: its process may exit well after its commit
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "import", "--config",
                                 str(config), str(crl)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while (pending or proc.poll() is None) and time.monotonic() < deadline:
            for i, kind in sorted(pending):
                node = servers[i]
                ok = (ocsp_status(node.http, der) == "revoked" if kind == "ocsp"
                      else ldap_status(node.ldap, target) == "revoked")
                if ok:
                    first_revoked[(i, kind)] = time.monotonic()
                    pending.discard((i, kind))
            time.sleep(POLL)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output
    finally:
        stop.set()
        thread.join(5)
        if proc is not None and proc.poll() is None:
            proc.kill()
    # the batch that revoked the target, and when its announcement was heard
    revoking = min(c.generation for c in watcher.changes_since(before)
                   if c.kind == "cert" and c.serial == target.serial)
    watcher.close()
    commit = min((t for t, g in announced if g >= revoking), default=None)
    assert commit is not None, f"generation {revoking} never announced: {announced}"
    seen = {key: t - commit for key, t in first_revoked.items()}
    print(f"\npropagation from the commit of generation {revoking} (s): "
          + ", ".join(f"node{i + 1} {k}={v:.3f}" for (i, k), v in sorted(seen.items())))
    assert not pending, f"never revoked: {sorted(pending)}"
    assert max(seen.values()) < PROPAGATION_BOUND, seen
    for node in servers:  # and it stays so
        assert ocsp_status(node.http, der) == "revoked"


# --- B: PostgreSQL goes away under traffic, and comes back ---------------------------------

class Traffic:
    """A thread asking both nodes about a revoked and a good certificate, over and over
    (OCSP without a nonce, the cached path; with a nonce for the revoked one; LDAP)."""

    def __init__(self, servers: list[Node], revoked: Any, good: Any, issuer: x509.Certificate):
        self.servers, self.revoked, self.good, self.issuer = servers, revoked, good, issuer
        self.requests = {"revoked": ocsp_request(revoked, issuer),
                         "good": ocsp_request(good, issuer)}
        self.seen: list[tuple[str, str, str | int]] = []  # (node, what, answer)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for i, node in enumerate(self.servers):
                for what, der in self.requests.items():
                    self._ask(f"node{i + 1}", f"ocsp-{what}", ocsp_status, node.http, der)
                self._ask(f"node{i + 1}", "ocsp-revoked-nonce", ocsp_status, node.http,
                          ocsp_request(self.revoked, self.issuer, nonce=True))
                self._ask(f"node{i + 1}", "ldap-revoked", ldap_status, node.ldap, self.revoked)
            time.sleep(POLL)

    def _ask(self, node: str, what: str, call: Any, *args: Any) -> None:
        try:
            self.seen.append((node, what, call(*args)))
        except Exception as exc:  # noqa: BLE001 - recorded: a refused connection is no answer
            self.errors.append(f"{node} {what}: {exc!r}")

    def wrong(self) -> list[tuple[str, str, str | int]]:
        """Answers calling the revoked certificate good (or valid)."""
        return [s for s in self.seen if "revoked" in s[1] and s[2] in ("good", "valid")]


def test_database_outage_under_traffic(nodes: tuple[list[Node], Path], demo_pki: Any,
                                       pg_cluster: Any) -> None:
    if pg_cluster.folder is None:
        pytest.skip("stopping an external PostgreSQL server is not for tests")
    servers, _ = nodes
    issuer = demo_pki.cas["rsa-ca"].load_certificate()
    revoked = next(c for c in demo_pki.certs if c.ca == "rsa-ca" and c.state == "revoked")
    good, fresh = [c for c in demo_pki.certs if c.ca == "rsa-ca" and c.state == "good"][:2]
    fresh_der = ocsp_request(fresh, issuer)  # never asked before the outage: not cached
    traffic = Traffic(servers, revoked, good, issuer)
    traffic.thread.start()
    stopped = False
    try:
        wait_until(lambda: len({(s[0], s[1]) for s in traffic.seen}) == 8, 30,
                   "every question answered")
        assert not traffic.wrong() and not traffic.errors, traffic.errors
        pg_cluster.stop_server()
        stopped = True
        outage = len(traffic.seen)
        counter = iter(range(10**9))
        for node in servers:
            wait_until(lambda node=node: health(node.http) == 503, 30, "health 503")
            wait_until(lambda node=node: ocsp_status(node.http, fresh_der) == "try_later", 30,
                       "OCSP tryLater")
            wait_until(lambda node=node: ldap_uncached(node.ldap, next(counter)) in (51, 52), 30,
                       "LDAP busy/unavailable")
        time.sleep(1.0)  # traffic keeps running against the dead database
        during = traffic.seen[outage:]
        allowed: dict[str, set[str | int]] = {
            "ocsp-revoked": {"revoked", "try_later"}, "ocsp-good": {"good", "try_later"},
            "ocsp-revoked-nonce": {"revoked", "try_later"}, "ldap-revoked": {"revoked", 51, 52}}
        assert during and all(s[2] in allowed[s[1]] for s in during), \
            sorted(set(during), key=repr)

        pg_cluster.start_server()
        stopped = False
        for node in servers:
            wait_until(lambda node=node: health(node.http) == 200, RECOVERY_BOUND, "health 200")
            wait_until(lambda node=node: ocsp_status(node.http, fresh_der) == "good",
                       RECOVERY_BOUND, "OCSP good again")
            wait_until(lambda node=node: ldap_uncached(node.ldap, next(counter)) == 0,
                       RECOVERY_BOUND, "LDAP again")
        mark = len(traffic.seen)
        wait_until(lambda: len({(s[0], s[1]) for s in traffic.seen[mark:]}) == 8, RECOVERY_BOUND,
                   "every question answered again")
        after = traffic.seen[mark:]
    finally:
        traffic.stop.set()
        traffic.thread.join(30)
        if stopped:
            pg_cluster.start_server()
    assert not traffic.wrong(), traffic.wrong()
    print(f"\nrefused during the test: {traffic.errors[:5]}")
    expected = {"ocsp-revoked": "revoked", "ocsp-good": "good", "ocsp-revoked-nonce": "revoked",
                "ldap-revoked": "revoked"}
    assert after and all(s[2] == expected[s[1]] for s in after), sorted(set(after), key=repr)
    answered = {(s[0], s[1]) for s in after}
    assert len(answered) == 8, answered  # both nodes, all four questions
    print(f"\ntraffic: {len(traffic.seen)} answers, {len(traffic.errors)} refused;"
          f" during the outage: {sorted({(s[1], s[2]) for s in during}, key=repr)}")

"""Fixtures of the hostile tests: the demo PKI in a store, both listeners of one ``app.start``.

``serve(**overrides)`` starts LDAP and HTTP on 127.0.0.1 (ports chosen by the kernel) over a
private copy of the imported demo store; ``live`` is one with the defaults of this folder
(HTTP ``idle_timeout`` 3 s so that slow-client deadlines are observable within a test).
``Heartbeat`` is the client "connected throughout": it opens one LDAP and one keep-alive HTTP
connection before an attack, uses both every 0.2 s during it, and records every failure and
the slowest answer.
"""

from __future__ import annotations

import dataclasses
import http.client
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import reactor, threads

from tests.hostile import wire
from tests.conftest import import_demo_store

LOOPBACK = "tcp:0:interface=127.0.0.1"


@pytest.fixture(scope="session")
def hostile_store_path(demo_pki: Any, demo_now: datetime,
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo PKI (index files, certificates, CRLs) imported once; copy before changing."""
    return import_demo_store(demo_pki, tmp_path_factory.mktemp("hostile-store") / "store.sqlite3",
                             demo_now)


@dataclasses.dataclass
class Live:
    running: Any
    config: Any
    store_path: Path
    pki: Any

    @property
    def ldap(self) -> wire.Addr:
        return self.running.address("ldap")

    @property
    def http(self) -> wire.Addr:
        return self.running.address("http")

    def good(self) -> Any:
        """A good demo certificate with an e-mail, of an issuing CA with an OCSP signer."""
        return next(c for c in self.pki.certs if c.state == "good" and c.emails)

    def ocsp_der(self, nonce: bool = True) -> bytes:
        cert = self.good()
        issuer = x509.load_pem_x509_certificate(self.pki.cas[cert.ca].cert_path.read_bytes())
        return wire.ocsp_request(cert.load(), issuer, nonce)


def copy_store(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "store.sqlite3"
    for suffix in ("", "-wal"):
        if Path(str(src) + suffix).exists():
            shutil.copyfile(str(src) + suffix, str(dst) + suffix)
    return dst


def start_live(pki: Any, store_path: Path, *, tls: Any = None, listen: str = LOOPBACK,
               ldap: dict[str, Any] | None = None, http: dict[str, Any] | None = None,
               now: Callable[[], datetime] | None = None,
               privacy: dict[str, Any] | None = None) -> Live:
    """Both listeners of one ``app.start``; blocks (call from a fixture, not a test body)."""
    from server import app
    from server.config import load_config

    config = load_config(pki.config_path)
    config = dataclasses.replace(
        config,
        store=dataclasses.replace(config.store, path=store_path),
        ldap=dataclasses.replace(config.ldap, listen=(listen,), **(ldap or {})),
        http=dataclasses.replace(config.http, listen=(listen,), **({"idle_timeout": 3.0}
                                                                    | (http or {}))),
        tls=tls,
        privacy=dataclasses.replace(config.privacy, **(privacy or {})),
    )
    running = pytest_twisted.blockon(
        app.start(config, reactor, now or (lambda: datetime.now(UTC))))
    return Live(running, config, store_path, pki)


@pytest.fixture
def serve(demo_pki: Any, hostile_store_path: Path, tmp_path: Path
          ) -> Iterator[Callable[..., Live]]:
    started: list[Live] = []

    def make(**kw: Any) -> Live:
        path = copy_store(hostile_store_path, tmp_path / f"store{len(started)}")
        live = start_live(demo_pki, path, **kw)
        started.append(live)
        return live

    yield make
    for live in started:
        pytest_twisted.blockon(live.running.stop())


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve()


# --- the client connected throughout, and a fresh one -------------------------------------------


def ldap_probe(client: wire.LdapClient, live: Live) -> None:
    mail = live.good().emails[0]
    r = client.search("c=MO", wire.eq("mail", mail), ["mail"])
    assert r.code == 0 and len(r.entries) == 1, (r.code, r.text, len(r.entries))


def ocsp_probe(status_body: tuple[int, bytes]) -> None:
    code, body = status_body
    assert code == 200, code
    assert wire.ocsp_status(body).name == "SUCCESSFUL", wire.ocsp_status(body)


def fresh_check(live: Live, budget: float = 1.0, source: str = "127.0.0.1") -> float:
    """A normal LDAP search and OCSP POST, each on a NEW connection, each within budget."""
    t = time.monotonic()
    with wire.LdapClient(live.ldap, timeout=budget + 1, source=source) as c:
        assert c.bind() == 0
        ldap_probe(c, live)
    ldap_s = time.monotonic() - t
    t = time.monotonic()
    ocsp_probe(wire.post_ocsp(live.http, live.ocsp_der(), timeout=budget + 1))
    http_s = time.monotonic() - t
    assert ldap_s < budget and http_s < budget, (ldap_s, http_s)
    return max(ldap_s, http_s)


class Heartbeat(threading.Thread):
    """One LDAP and one keep-alive HTTP connection, opened first and used every 0.2 s."""

    def __init__(self, live: Live, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.live = live
        self.period = period
        self.ready = threading.Event()
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0
        self.slowest = 0.0

    def run(self) -> None:
        try:
            ldap = wire.LdapClient(self.live.ldap, timeout=3)
            assert ldap.bind() == 0
            conn = http.client.HTTPConnection(*self.live.http, timeout=3)
            der = self.live.ocsp_der(nonce=False)
            self._round(ldap, conn, der)
        except Exception as exc:  # noqa: BLE001 - reported by check()
            self.errors.append(f"setup: {exc!r}")
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.halt.wait(self.period):
                try:
                    self._round(ldap, conn, der)
                except Exception as exc:  # noqa: BLE001 - reported by check()
                    self.errors.append(repr(exc))
                    return
        finally:
            ldap.close()
            conn.close()

    def _round(self, ldap: wire.LdapClient, conn: http.client.HTTPConnection,
               der: bytes) -> None:
        t = time.monotonic()
        ldap_probe(ldap, self.live)
        code, _, body = wire.exchange(conn, "POST", "/ocsp", der,
                                      {"Content-Type": "application/ocsp-request"})
        ocsp_probe((code, body))
        self.slowest = max(self.slowest, time.monotonic() - t)
        self.rounds += 1

    def finish(self) -> None:
        """Stop, then assert the connections were served all along, each round within 1 s."""
        after = self.rounds
        end = time.monotonic() + 5
        while self.rounds <= after and not self.errors and time.monotonic() < end:
            time.sleep(0.05)  # at least one round after the attack
        self.halt.set()
        self.join(10)
        assert not self.errors, self.errors
        assert self.rounds > after, (self.rounds, after)
        assert self.slowest < 1.0, self.slowest


async def heartbeat(live: Live) -> Heartbeat:
    hb = Heartbeat(live)
    hb.start()
    await threads.deferToThread(hb.ready.wait, 10)
    assert not hb.errors, hb.errors
    return hb


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await threads.deferToThread(fn, *args, **kw)

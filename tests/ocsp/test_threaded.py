"""OCSP with its store work in store threads, on real listeners (127.0.0.1, port 0).

A gate holds a chosen store read in its pool thread, standing for a database that hangs:
meanwhile the reactor must keep answering (a cached GET, an LDAP root DSE search), and the
HTTP listener must keep pipelined answers in request order. Waits are on events, never on time.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import reactor, threads

from server.ldap.server import make_ldap_factory
from server.http.site import make_http_factory
from server.storeaccess import StoreAccess
from store.sqlite import Store
from tests.ldap.conftest import ldap_config
from tests.ocsp.helpers import WallClock, config_for, fill_store, make_ca, ocsp_fetch, request_der
from tests.test_storeaccess import WAIT, BrokenStore, Gate, GatedStore, wait_event


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "web", at=clock.now)
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    path = tmp_path / "store.sqlite3"
    store = Store.open(path)
    fill_store(store, ca, clock.now - timedelta(seconds=30))
    yield {"ca": ca, "path": path, "store": store, "clock": clock}
    store.close()


def serve(env: dict[str, Any], opener: Any, *, ldap: bool = False) -> dict[str, Any]:
    access = StoreAccess(str(env["path"]), 2, opener=opener)
    access.start()
    site = make_http_factory(config_for(env["ca"]), None, None, env["clock"], reactor,
                             access=access)
    ports = {"http": reactor.listenTCP(0, site, interface="127.0.0.1")}  # type: ignore[attr-defined]
    if ldap:
        factory = make_ldap_factory(ldap_config(naming_contexts=("o=Test",)), None, None, None,  # type: ignore[arg-type]
                                    env["clock"], access=access)
        ports["ldap"] = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    return {"access": access, "site": site, "ports": ports,
            **{name: p.getHost().port for name, p in ports.items()}}


async def shut(running: dict[str, Any]) -> None:
    for port in running["ports"].values():
        await port.stopListening()
    running["access"].stop()


def fetch(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    return ocsp_fetch(port, method, path, body, timeout=WAIT)


def status_of(der: bytes) -> list[Any]:
    resp = c_ocsp.load_der_ocsp_response(der)
    assert resp.response_status == c_ocsp.OCSPResponseStatus.SUCCESSFUL, resp.response_status
    return [(r.serial_number, r.certificate_status) for r in resp.responses]


def get_path(der: bytes) -> str:
    return "/ocsp/" + base64.b64encode(der).decode()


def root_dse(port: int) -> list[bytes]:
    import ldap3

    server = ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE, connect_timeout=WAIT)
    conn = ldap3.Connection(server, auto_bind=True, receive_timeout=int(WAIT))
    try:
        conn.search("", "(objectClass=*)", search_scope=ldap3.BASE,
                    attributes=["namingContexts"])
        return list(conn.response[0]["raw_attributes"]["namingContexts"])
    finally:
        conn.unbind()


@pytest_twisted.ensureDeferred
async def test_a_hanging_store_does_not_block_the_reactor(env: dict[str, Any]) -> None:
    gate = Gate("ca_by_issuer_hash")
    path = env["path"]
    running = serve(env, lambda: GatedStore(Store.open(path, create=False), gate), ldap=True)
    cached = get_path(request_der(env["ca"], [1]))
    try:
        status, body = await threads.deferToThread(fetch, running["http"], "GET", cached)
        assert status == 200 and status_of(body) == [(1, c_ocsp.OCSPCertStatus.GOOD)]
        gate.armed = True  # from now on, an OCSP miss hangs in the store
        hanging = threads.deferToThread(fetch, running["http"], "POST", "/ocsp",
                                        request_der(env["ca"], [2]))
        assert await wait_event(gate.entered)
        # meanwhile, on other connections: a cached GET and an LDAP root DSE search
        status, body = await threads.deferToThread(fetch, running["http"], "GET", cached)
        assert status == 200 and status_of(body) == [(1, c_ocsp.OCSPCertStatus.GOOD)]
        assert await threads.deferToThread(root_dse, running["ldap"]) == [b"o=Test"]
        assert not hanging.called
        gate.release.set()
        status, body = await hanging
        assert status == 200 and status_of(body) == [(2, c_ocsp.OCSPCertStatus.GOOD)]
    finally:
        gate.release.set()
        await shut(running)


def pipeline(port: int, requests: list[bytes], answers: int) -> list[bytes]:
    """Send every request at once on one connection; the bodies of the first answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(b"".join(requests))
        f = s.makefile("rb")
        bodies = []
        for _ in range(answers):
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200 "), status
            length = None
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            assert length is not None  # never chunked
            bodies.append(f.read(length))
        return bodies


def post(der: bytes, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (len(der), extra)
            + der)


def get(der: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % get_path(der).encode()


@pytest_twisted.ensureDeferred
async def test_pipelined_answers_keep_request_order(env: dict[str, Any]) -> None:
    """A slow miss, then a hit, another miss and a publication request."""
    gate = Gate("ca_by_issuer_hash")
    path = env["path"]
    running = serve(env, lambda: GatedStore(Store.open(path, create=False), gate))
    hit, slow, fast = (request_der(env["ca"], [n]) for n in (1, 2, 3))
    try:
        status, _ = await threads.deferToThread(fetch, running["http"], "POST", "/ocsp", hit)
        assert status == 200  # now cached
        gate.armed = True
        answered = threads.deferToThread(
            pipeline, running["http"],
            [post(slow), get(hit), post(fast), b"GET /ca/web.crt HTTP/1.1\r\nHost: x\r\n\r\n",
             post(hit, close=True)], 5)
        assert await wait_event(gate.entered)
        gate.armed = False  # only the first miss hangs; the next one passes the gate
        gate.release.set()
        bodies = await answered
        assert [status_of(b) for b in bodies[:3]] == [
            [(2, c_ocsp.OCSPCertStatus.GOOD)], [(1, c_ocsp.OCSPCertStatus.GOOD)],
            [(3, c_ocsp.OCSPCertStatus.GOOD)]]
        assert bodies[3] == env["ca"].der  # the publication answer after the OCSP ones
        assert status_of(bodies[4]) == [(1, c_ocsp.OCSPCertStatus.GOOD)]
    finally:
        gate.release.set()
        await shut(running)


@pytest_twisted.ensureDeferred
async def test_store_errors_in_a_pool_thread_are_try_later_and_503(env: dict[str, Any]) -> None:
    running = serve(env, BrokenStore)
    try:
        der = request_der(env["ca"], [1])
        for method, path, body in (("POST", "/ocsp", der), ("GET", get_path(der), None)):
            status, answer = await threads.deferToThread(fetch, running["http"], method, path,
                                                         body)
            resp = c_ocsp.load_der_ocsp_response(answer)
            assert status == 200 and resp.response_status == c_ocsp.OCSPResponseStatus.TRY_LATER
        status, answer = await threads.deferToThread(fetch, running["http"], "GET",
                                                     "/crl/web.crl")
        assert status == 503 and b"Traceback" not in answer
        status, answer = await threads.deferToThread(fetch, running["http"], "GET", "/")
        assert status == 200  # the index page without the store's CRL numbers
    finally:
        await shut(running)

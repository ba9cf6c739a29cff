"""The HTTP adapter on a real listener (127.0.0.1, port 0), driven by http.client in a thread."""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from cryptography.x509 import ocsp as c_ocsp
from twisted.internet import reactor, threads
from twisted.logger import capturedLogs

from server.ocsp.codec import MalformedRequest
from server.http.ocsp import decode_get_path
from server.http.accesslog import lines as access_lines
from server.http.site import make_http_factory
from server.storeaccess import StoreAccess
from store.certparse import crl_input
from tests.ocsp.helpers import WallClock, config_for, fill_store, make_ca, request_der


def crl_der(ca: Any, number: int) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    now = datetime.now(UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(now - timedelta(hours=1)).next_update(now + timedelta(days=7))
         .add_extension(x509.CRLNumber(number), critical=False))
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(params=[0, 2, "postgresql"], ids=["inline", "threads2", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The site with its store calls inline, or in two store threads ([store] threads), on
    SQLite; or in two store threads on a PostgreSQL database."""
    from store import open_store

    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "web", at=clock.now)
    for serial in (1, 2):
        ca.subscriber(serial)
    if request.param == "postgresql":
        location, threads = request.getfixturevalue("pg_url"), 2
    else:
        location, threads = str(tmp_path / "store.sqlite3"), request.param
    store = open_store(location)
    ca_id = fill_store(store, ca, clock.now - timedelta(seconds=30))
    with store.batch(clock.now) as b:
        b.apply_crl(crl_input(crl_der(ca, 7), ca_id), "test")
    access = StoreAccess(location, threads, store=store)
    access.start()
    site = make_http_factory(config_for(ca), store, None, clock, reactor, access=access)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    yield {"ca": ca, "port": port.getHost().port, "site": site, "clock": clock, "store": store,
           "tmp": tmp_path}
    pytest_twisted.blockon(port.stopListening())
    access.stop()
    store.close()


def fetch(port: int, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def call(*args: Any, **kw: Any) -> Any:
    return await threads.deferToThread(fetch, *args, **kw)


def statuses(der: bytes) -> list[c_ocsp.OCSPCertStatus]:
    return [r.certificate_status for r in c_ocsp.load_der_ocsp_response(der).responses]


@pytest_twisted.ensureDeferred
async def test_post_at_every_ocsp_path(server: dict[str, Any]) -> None:
    der = request_der(server["ca"], [1])
    for path in ("/", "/ocsp"):
        code, headers, body = await call(server["port"], "POST", path, der,
                                         {"Content-Type": "application/ocsp-request"})
        assert code == 200 and headers["content-type"] == "application/ocsp-response"
        assert headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in headers
        assert statuses(body) == [c_ocsp.OCSPCertStatus.GOOD]


@pytest_twisted.ensureDeferred
async def test_post_without_content_type_is_still_answered(server: dict[str, Any]) -> None:
    code, _, body = await call(server["port"], "POST", "/ocsp", request_der(server["ca"], [2]))
    assert code == 200 and statuses(body) == [c_ocsp.OCSPCertStatus.GOOD]


@pytest_twisted.ensureDeferred
async def test_get_with_percent_encoding_and_caching_headers(server: dict[str, Any]) -> None:
    der = request_der(server["ca"], [1])
    b64 = base64.b64encode(der).decode()
    post = await call(server["port"], "POST", "/ocsp", der)
    for path in (f"/ocsp/{quote(b64, safe='')}", f"/ocsp/{b64}", f"/{quote(b64, safe='')}"):
        code, headers, body = await call(server["port"], "GET", path)
        assert code == 200 and body == post[2]  # GET and POST share the cached response
        cc = headers["cache-control"]
        assert "public" in cc and "no-transform" in cc and "must-revalidate" in cc
        max_age = int(cc.split("max-age=")[1].split(",")[0])
        assert 0 < max_age <= 86400
        assert headers["etag"].startswith('"') and headers["last-modified"]
        assert headers["expires"]
        code2, headers2, body2 = await call(server["port"], "GET", path,
                                            headers={"If-None-Match": headers["etag"]})
        assert code2 == 304 and body2 == b"" and headers2["etag"] == headers["etag"]
        code3, _, _ = await call(server["port"], "GET", path,
                                 headers={"If-Modified-Since": headers["last-modified"]})
        assert code3 == 304


def test_decode_get_path() -> None:
    der = b"\xfb\xff\xfe0\x82"
    b64 = base64.b64encode(der)
    assert b"+" in b64 or b"/" in b64
    assert decode_get_path(quote(b64.decode(), safe="").encode()) == der
    assert decode_get_path(b64.rstrip(b"=")) == der
    with pytest.raises(MalformedRequest):
        decode_get_path(b"!!!notbase64")


@pytest_twisted.ensureDeferred
async def test_errors_and_limits(server: dict[str, Any]) -> None:
    port = server["port"]
    code, headers, body = await call(port, "GET", "/ocsp/%%%invalid")
    assert code == 200 and body == b"\x30\x03\x0a\x01\x01"  # malformedRequest
    assert headers["cache-control"] == "no-store"
    code, _, body = await call(port, "POST", "/ocsp", b"\x30\x00")
    assert body == b"\x30\x03\x0a\x01\x01"
    stranger = make_ca(server["tmp"] / "x", "x", at=server["clock"].now)
    code, _, body = await call(port, "POST", "/ocsp", request_der(stranger, [1]))
    assert body == b"\x30\x03\x0a\x01\x06"  # unauthorized
    code, headers, _ = await call(port, "PUT", "/ocsp", b"x")
    assert code == 405 and "POST" in headers["allow"]
    assert (await call(port, "POST", "/elsewhere", b"x"))[0] == 404
    assert (await call(port, "GET", "/nothing/here"))[0] == 404
    code, headers, body = await call(port, "POST", "/ocsp", b"\x30" * 70_000)
    assert code == 413 and headers["connection"] == "close"


@pytest_twisted.ensureDeferred
async def test_413_without_reading_the_body(server: dict[str, Any]) -> None:
    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            return s.recv(4096)  # answered before any body byte was sent

    reply = await threads.deferToThread(send)
    assert reply.startswith(b"HTTP/1.1 413 ")


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive_and_http11_pipelining(server: dict[str, Any]) -> None:
    der = request_der(server["ca"], [1])

    def exchange(version: bytes, extra: bytes, count: int) -> bytes:
        head = (b"POST /ocsp " + version + b"\r\nHost: x\r\nContent-Type: application/ocsp-request"
                b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(der))
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall((head + der) * count)
            data = b""
            while data.count(b" 200 OK") < count:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    data = await threads.deferToThread(exchange, b"HTTP/1.0", b"Connection: keep-alive\r\n", 2)
    assert data.count(b"HTTP/1.0 200 OK") == 2 and b"Connection: keep-alive" in data
    data = await threads.deferToThread(exchange, b"HTTP/1.1", b"", 3)
    assert data.count(b"HTTP/1.1 200") == 3 and b"chunked" not in data.lower()


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_late_gets_every_answer_in_order(
        server: dict[str, Any]) -> None:
    """Answers go to the socket at once while nothing is buffered (listener.direct_send),
    else through the transport's buffer: a client that sends thousands of pipelined
    requests before reading any answer (its receive buffer small) gets them all, whole and
    in order."""
    ders = [request_der(server["ca"], [1]), request_der(server["ca"], [2])]
    for der in ders:  # signed, then hot: from here on every answer is one write
        for _ in range(2):
            assert (await call(server["port"], "POST", "/ocsp", der))[0] == 200
    count = 20_000

    def exchange() -> bytes:
        heads = [b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(d) + d
                 for d in ders]
        last = b"POST /ocsp HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(
            ders[0]) + ders[0]  # the server closes after answering it
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(30)
            s.connect(("127.0.0.1", server["port"]))
            sender = threading.Thread(target=s.sendall, args=(
                b"".join(heads[j % 2] for j in range(count)) + last,))
            sender.start()
            time.sleep(0.5)  # nothing read yet: the kernel's buffers fill, then the server's
            chunks = []
            while chunk := s.recv(1 << 20):
                chunks.append(chunk)
            sender.join()
            return b"".join(chunks)

    data = await threads.deferToThread(exchange)
    answers = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(answers) == count + 1
    serials = []
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert len(body) == n
        serials.append(c_ocsp.load_der_ocsp_response(body).serial_number)
    assert serials == [1, 2] * (count // 2) + [1]


@pytest_twisted.ensureDeferred
async def test_publication(server: dict[str, Any]) -> None:
    port, ca = server["port"], server["ca"]
    code, headers, body = await call(port, "GET", "/ca/web.crt")
    assert code == 200 and headers["content-type"] == "application/pkix-cert" and body == ca.der
    code, _, pem = await call(port, "GET", "/ca/web.pem")
    assert code == 200 and pem.startswith(b"-----BEGIN CERTIFICATE-----")
    code, headers, body = await call(port, "GET", "/crl/web.crl")
    assert code == 200 and headers["content-type"] == "application/pkix-crl"
    assert body.startswith(b"\x30")
    assert headers["last-modified"] and headers["etag"]
    assert (await call(port, "GET", "/crl/web.crl", headers={"If-None-Match": headers["etag"]}))[0] == 304
    assert (await call(port, "GET", "/crl/other.crl"))[0] == 404
    assert (await call(port, "GET", "/ca/other.crt"))[0] == 404
    assert (await call(port, "POST", "/ca/web.crt", b"x"))[0] == 405
    code, headers, body = await call(port, "GET", "/")
    # the search page lists the CA files with the CRL number
    assert code == 200 and b'href="/crl/web.crl"' in body and b'">7</td>' in body


@pytest_twisted.ensureDeferred
async def test_one_log_line_per_request_without_the_body(server: dict[str, Any]) -> None:
    der = request_der(server["ca"], [2], nonce=b"q" * 32)
    with capturedLogs() as events:
        await call(server["port"], "POST", "/ocsp", der)
        server["site"].access.flush()  # lines are written in batches, FLUSH_DELAY apart
    lines = access_lines(events)
    assert len(lines) == 1
    e = lines[0]
    assert (e["kind"], e["ca"], e["serials"], e["statuses"], e["nonce"], e["cache"], e["status"],
            e["ocsp"]) == ("ocsp", "web", "2", "good", "yes", "nonce", 200, "successful")
    assert e["client"] == "127.0.0.1" and e["bytes"] > 0 and float(e["duration"]) >= 0
    assert not any(isinstance(v, bytes) and der in v for v in e.values())


@pytest_twisted.ensureDeferred
async def test_413_for_a_chunked_body_over_the_limit(server: dict[str, Any]) -> None:
    def send() -> bytes:
        chunk = b"%x\r\n%s\r\n" % (40_000, b"\x30" * 40_000)
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            s.sendall(chunk * 2)
            return s.recv(4096)

    reply = await threads.deferToThread(send)
    assert reply.startswith(b"HTTP/1.1 413 ")


@pytest_twisted.ensureDeferred
async def test_reload_and_ops_mount(server: dict[str, Any]) -> None:
    from server.health import HealthCheck, OpsRoute
    from server.metrics import Metrics

    site, store = server["site"], server["store"]
    health = HealthCheck(store, None, server["clock"], site.service.signer_expiries)
    site.http_site.ops = OpsRoute(health, Metrics(process=False))
    assert (await call(server["port"], "GET", "/healthz"))[0] == 404  # not for the public
    site.http_site.ops_allowed = lambda client: client == "127.0.0.1"  # [ops] public_networks
    assert (await call(server["port"], "GET", "/healthz"))[0] == 200
    assert (await call(server["port"], "GET", "/ca/web.crt"))[0] == 200
    site.reload(config_for(server["ca"]))
    code, _, body = await call(server["port"], "POST", "/ocsp", request_der(server["ca"], [1]))
    assert code == 200 and statuses(body) == [c_ocsp.OCSPCertStatus.GOOD]

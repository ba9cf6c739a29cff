"""The search pages on a real listener (127.0.0.1, port 0), inline and with store threads."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from twisted.internet import reactor
from twisted.internet import threads as threads_

from importer.run import import_openssl, import_paths
from server import app
from server.config import load_config


def _get(url: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


async def get(base: str, path: str, **kw: Any) -> tuple[int, bytes, Any]:
    return await threads_.deferToThread(_get, base + path, **kw)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served_pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from server.demo.pki import build_demo_pki

    folder = tmp_path_factory.mktemp("webpki")
    pki = build_demo_pki(folder / "pki")
    config = load_config(pki.config_path)
    now = lambda: datetime.now(UTC)  # noqa: E731
    import_openssl(config, now=now, progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path], now=now,
                 progress=None)
    return pki, config


def _config(config: Any, threads: int, per_address: int = 100) -> Any:
    return dataclasses.replace(
        config,
        ldap=dataclasses.replace(config.ldap, listen=()),
        http=dataclasses.replace(config.http, listen=("tcp:0:interface=127.0.0.1",),
                                 max_connections_per_address=per_address),
        store=dataclasses.replace(config.store, threads=threads),
    )


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threads2"])
@pytest_twisted.ensureDeferred
async def test_search_page_certificate_page_downloads_and_api(served_pki: Any,
                                                               threads: int) -> None:
    pki, config = served_pki
    running = await app.start(_config(config, threads), reactor, lambda: datetime.now(UTC))
    try:
        host, port = running.address("http")
        base = f"http://{host}:{port}"
        revoked = next(c for c in pki.certs if c.state == "revoked" and c.emails)
        # the search page by mail, in Portuguese by Accept-Language
        status, body, headers = await get(base, "/?q=" + quote(revoked.emails[0].upper()),
                                          headers={"Accept-Language": "pt-PT,pt;q=0.9"})
        page = body.decode()
        assert status == 200 and '<html lang="pt">' in page
        assert "Foi encontrado um certificado" in page
        assert f'href="/cert/{revoked.ca}/{revoked.serial:x}"' in page
        # the result row offers the downloads themselves (what a mail sender came for),
        # each link named for the holder in the page's language
        for ext, kind in (("cer", "DER"), ("pem", "PEM")):
            link = re.search(rf'<a href="/cert/{revoked.ca}/{revoked.serial:x}\.{ext}" download'
                             r' aria-label="([^"]+)">', page)
            assert link and f"certificado ({kind}, .{ext})" in link.group(1), page
            status, data, _ = await get(base, f"/cert/{revoked.ca}/{revoked.serial:x}.{ext}")
            assert status == 200 and data
        assert headers["Vary"] == "Accept-Language"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        # /search is the same page; a Chinese name
        status, body, _ = await get(base, "/search?q=" + quote("陳") + "&lang=zh-Hant")
        assert status == 200 and "陳大文" in body.decode() and '<html lang="zh-Hant">' in body.decode()
        # the certificate page, its serial spelled another way
        status, body, _ = await get(base, f"/cert/{revoked.ca}/0x00{revoked.serial:X}")
        page = body.decode()
        assert status == 200 and "s-revoked" in page and "Revoked" in page
        assert f'<link rel="canonical" href="/cert/{revoked.ca}/{revoked.serial:x}">' in page
        # private subject attributes never leave: street, ID number, telephone
        private = next(c for c in pki.certs if "2.5.4.20" in c.subject_rfc4514)
        status, body, _ = await get(base, f"/cert/{private.ca}/{private.serial:x}")
        assert status == 200 and "Avenida" not in body.decode() and "+853" not in body.decode()
        assert "ID-" not in body.decode()
        status, body, _ = await get(base, f"/api/v1/cert/{private.ca}/{private.serial:x}")
        assert status == 200 and b"Avenida" not in body and b"ID-" not in body
        # downloads: the DER, the PEM, the chain to the root
        cert = revoked.load()
        status, body, headers = await get(base, f"/cert/{revoked.ca}/{revoked.serial:x}.cer")
        assert status == 200 and body == cert.public_bytes(Encoding.DER)
        assert headers["Content-Type"] == "application/pkix-cert"
        assert "attachment" in headers["Content-Disposition"]
        status, body, _ = await get(base, f"/cert/{revoked.ca}/{revoked.serial:x}.pem")
        assert body == cert.public_bytes(Encoding.PEM)
        status, body, _ = await get(base, f"/cert/{revoked.ca}/{revoked.serial:x}.p7c")
        chain = pkcs7.load_der_pkcs7_certificates(body)
        # a SET OF: in DER order, not path order
        assert len(chain) == 3 and cert in chain
        issuing = next(c for c in chain if c.subject == cert.issuer)
        assert any(c.subject == issuing.issuer == c.issuer for c in chain)  # the root
        # the JSON API
        status, body, headers = await get(base, "/api/v1/search?q=0x80&type=serial")
        doc = json.loads(body)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert doc["total"] == 2 and {r["ca"] for r in doc["results"]} == {"rsa-ca", "ec-ca"}
        assert all(r["serial"] == "80" and r["url"].endswith("/80") for r in doc["results"])
        status, body, _ = await get(base, f"/api/v1/cert/{revoked.ca}/{revoked.serial:x}")
        doc = json.loads(body)
        assert doc["status"] == "revoked" and doc["reason"] == revoked.reason
        assert doc["files"]["cer"] == f"/cert/{revoked.ca}/{revoked.serial:x}.cer"
        # errors: each with its status and words
        status, body, _ = await get(base, "/api/v1/search?q=" + "x" * 300)
        assert status == 400 and json.loads(body)["error"]["code"] == "query_too_long"
        status, body, _ = await get(base, "/api/v1/cert/rsa-ca/dead00")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        status, body, _ = await get(base, "/?q=a&ca=nope")
        assert status == 404 and "no certification authority named" in body.decode()
        status, body, _ = await get(base, "/cert/rsa-ca/not-hex")
        assert status == 404
        status, body, _ = await get(base, "/cert/%ff/80")
        assert status == 404
        status, _, headers = await get(base, "/search", method="POST")  # POST / is OCSP
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        status, body, headers = await get(base, "/static/certpub.css")
        assert status == 200 and headers["Content-Type"].startswith("text/css") and b".badge" in body
        status, body, headers = await get(base, "/", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
        # OCSP and the CA files still answer beside the pages
        status, body, _ = await get(base, "/ca/rsa-ca.pem")
        assert status == 200 and body.startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        await running.stop()


def _hold_connections(host: str, port: int, n: int) -> tuple[list[socket.socket], bytes]:
    """Open n connections, then ask for a page on one more: what it answers."""
    held = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
    try:
        for s in held:  # each one is accepted and served
            s.sendall(b"GET /static/certpub.css HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.1 200"
        extra = socket.create_connection((host, port), timeout=5)
        try:
            extra.sendall(b"GET /?q=a HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = extra.recv(100)
        except OSError:
            answer = b""
        finally:
            extra.close()
        return held, answer
    finally:
        for s in held:
            s.close()


@pytest_twisted.ensureDeferred
async def test_per_address_connection_limit_applies_to_the_pages(served_pki: Any) -> None:
    _, config = served_pki
    running = await app.start(_config(config, 0, per_address=3), reactor,
                              lambda: datetime.now(UTC))
    try:
        host, port = running.address("http")
        _, answer = await threads_.deferToThread(_hold_connections, host, port, 3)
        assert not answer.startswith(b"HTTP/1.1 200"), answer
        # once the server has seen them close, a page answers again
        from twisted.internet.task import deferLater

        for _ in range(50):
            await deferLater(reactor, 0.1, lambda: None)
            try:
                status, _, _ = await get(f"http://{host}:{port}", "/?q=a")
                break
            except OSError:
                continue
        assert status == 200
    finally:
        await running.stop()

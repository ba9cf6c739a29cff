"""Issue 23 with real clients: every URL printed in the demo PKI's certificates answered here.

The demo PKI is built for the ports of listeners opened first, so its CRL distribution
point, freshest CRL and caIssuers URLs (http:// and ldap://) name this HTTP and LDAP
listener; the real importer fills the store with the certificates and every CRL (the full
ones, ec-ca's two partitions and their deltas). Then ``curl`` fetches each http:// URL of
every certificate and ``ldapsearch`` reads each ldap:// URL's DN and attribute, and the bytes
are compared with the CRL or certificate file the URL names; pyhanko-certvalidator, with OCSP
switched off, follows a certificate's distribution point to its partition.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import pytest_twisted
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory

from server.config import load_config
from server.feed import ChangeFeed
from server.http.site import make_http_factory
from server.ldap.server import make_ldap_factory
from server.storeaccess import StoreAccess
from store.sqlite import Store
from tests.conftest import require_tool
from tests.ldap.test_integration import ldif
from tests.ocsp.test_clients import _pyhanko_validate

pytestmark = pytest.mark.realclient


class _Later(Factory):
    """Listens first (the demo PKI's URLs need the port), serves once built."""

    real: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        return self.real.buildProtocol(addr)


def all_crl_files(pki: Any) -> list[Path]:
    return [p for ca in pki.cas.values() if ca.crl_path is not None
            for p in (ca.crl_path, *ca.scope_crl_paths)]


def serve(folder: Path, threads: int, subscribers: int = 25) -> Iterator[dict[str, Any]]:
    """The demo PKI built for two listeners' ports, imported (every CRL), served."""
    from importer.run import import_openssl, import_paths
    from server.demo.pki import build_demo_pki

    http_proxy, ldap_proxy = _Later(), _Later()
    http = reactor.listenTCP(0, http_proxy, interface="127.0.0.1")  # type: ignore[attr-defined]
    ldap = reactor.listenTCP(0, ldap_proxy, interface="127.0.0.1")  # type: ignore[attr-defined]
    now = datetime.now(UTC).replace(microsecond=0)
    pki = build_demo_pki(folder, now=now, http_port=http.getHost().port,
                         ldap_port=ldap.getHost().port, subscribers_per_ca=subscribers)
    config = load_config(pki.config_path)
    import_openssl(config, now=lambda: datetime.now(UTC), progress=None)
    import_paths(config, all_crl_files(pki), now=lambda: datetime.now(UTC), progress=None)
    store = Store.open(config.store.path)
    access = StoreAccess(str(config.store.path), threads, store=store)
    access.start()
    feed = ChangeFeed(access.store, interval=0.2, access=access)
    site = make_http_factory(config, store, feed, lambda: datetime.now(UTC), reactor,
                             access=access)
    site.doStart()
    http_proxy.real = site
    ldap_proxy.real = make_ldap_factory(config.ldap, store, feed, None,
                                        lambda: datetime.now(UTC), access=access)
    feed.start()
    yield {"pki": pki, "http": http.getHost().port, "ldap": ldap.getHost().port,
           "store": store, "config": config, "feed": feed}
    feed.stop()
    site.doStop()
    pytest_twisted.blockon(http.stopListening())
    pytest_twisted.blockon(ldap.stopListening())
    access.stop()
    store.close()


@pytest.fixture(scope="module", params=[0, 2], ids=["inline", "threads2"])
def live(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from serve(tmp_path_factory.mktemp("crl-live"), request.param)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A demo of its own, for tests that import more into its store."""
    yield from serve(tmp_path / "demo", 0, subscribers=15)


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await threads.deferToThread(  # the reactor keeps serving meanwhile
        subprocess.run, list(args), capture_output=True, timeout=60)


def der_of(path: Path) -> bytes:
    data = path.read_bytes()
    if b"BEGIN X509 CRL" in data:
        return x509.load_pem_x509_crl(data).public_bytes(Encoding.DER)
    return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)


def printed_urls(cert: x509.Certificate) -> list[tuple[str, str]]:
    """(kind, URL) of the CDP ("crl"), freshest CRL ("delta") and caIssuers ("ca")."""
    out: list[tuple[str, str]] = []
    for kind, cls in (("crl", x509.CRLDistributionPoints), ("delta", x509.FreshestCRL)):
        try:
            points = cert.extensions.get_extension_for_class(cls).value  # type: ignore[type-var]
        except x509.ExtensionNotFound:
            continue
        out += [(kind, n.value) for p in points for n in p.full_name or ()]
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return out
    return out + [("ca", d.access_location.value) for d in aia
                  if d.access_method == x509.oid.AuthorityInformationAccessOID.CA_ISSUERS]


def expected(pki: Any, issuer: str, kind: str, url: str) -> bytes:
    """The bytes a URL names: the CRL file whose IDP names it (its delta for a freshest-CRL
    URL), the CA's full CRL for a URL no IDP names, the issuer certificate for caIssuers."""
    ca = pki.cas[issuer]
    if kind == "ca":
        return der_of(ca.cert_path)
    for path in ca.scope_crl_paths:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
        delta = path.stem.endswith("-delta")
        cdp = [n.value for n in idp.full_name or ()]
        if delta == (kind == "delta") and (url in cdp or url.replace("-delta.crl", ".crl")
                                           in cdp or url.replace("deltaRevocationList",
                                                                 "certificateRevocationList")
                                           in cdp):
            return der_of(path)
    assert kind == "crl", url
    return der_of(ca.crl_path)


def issuer_of(pki: Any, cert: x509.Certificate) -> str:
    return next(name for name, ca in pki.cas.items()
                if ca.load_certificate().subject == cert.issuer)


def every_certificate(pki: Any) -> list[x509.Certificate]:
    cas = [ca.load_certificate() for ca in pki.cas.values()]
    return cas + [c.load() for c in pki.certs]


def ldap_search(live: dict[str, Any], url: str) -> list[str]:
    """The ldapsearch command an ldap:// URL stands for (RFC 4516): its DN as a base."""
    parts = urlsplit(url)
    dn = unquote(parts.path[1:])
    attr = unquote(parts.query.split("?")[0])
    return [require_tool("ldapsearch"), "-x", "-LLL", "-o", "ldif-wrap=no",
            "-H", f"ldap://127.0.0.1:{live['ldap']}", "-s", "base", "-b", dn, "(objectClass=*)",
            attr]


@pytest_twisted.ensureDeferred
async def test_every_printed_url_fetched_with_curl_and_ldapsearch(live: dict[str, Any]) -> None:
    pki = live["pki"]
    curl = require_tool("curl")
    done: set[str] = set()
    kinds: set[tuple[str, str]] = set()
    for cert in every_certificate(pki):
        if cert.issuer == cert.subject:
            continue  # the root prints no URLs
        issuer = issuer_of(pki, cert)
        for kind, url in printed_urls(cert):
            if url in done:
                continue
            done.add(url)
            want = expected(pki, issuer, kind, url)
            if url.startswith("http://"):
                r = await run(curl, "-sS", "--fail", "-D", "-", "-o", "-", url)
                assert r.returncode == 0, (url, r.stderr)
                head, _, body = r.stdout.partition(b"\r\n\r\n")
                if url.endswith(".p7c"):
                    assert b"application/pkcs7-mime" in head
                    signed = cms.ContentInfo.load(body)["content"]
                    assert [c.dump() for c in signed["certificates"]] == [want], url
                else:
                    assert body == want, url
                    ctype = b"application/pkix-" + (b"cert" if kind == "ca" else b"crl")
                    assert b"Content-Type: " + ctype in head, (url, head)
                kinds.add(("http", kind))
            else:
                assert url.startswith("ldap://"), url
                r = await run(*ldap_search(live, url))
                assert r.returncode == 0, (url, r.stderr)
                entries = ldif(r.stdout)
                attr = unquote(urlsplit(url).query).lower()
                assert len(entries) == 1 and want in entries[0][attr], (url, entries)
                kinds.add(("ldap", kind))
    assert kinds == {(s, k) for s in ("http", "ldap") for k in ("crl", "delta", "ca")}


@pytest_twisted.ensureDeferred
async def test_ldap_entries_answer_with_and_without_binary(live: dict[str, Any]) -> None:
    """A distribution point's DN carries cn and objectClass cRLDistributionPoint; the CRL
    is named ``;binary`` whichever spelling was asked; the CA entry carries deltas only
    when its full scope has one (ec-ca's deltas are its partitions')."""
    pki = live["pki"]
    cert = next(c.load() for c in pki.certs if c.ca == "ec-ca")
    url = next(u for k, u in printed_urls(cert) if k == "crl" and u.startswith("ldap://"))
    cmd = ldap_search(live, url)
    plain = await run(*cmd[:-1], "certificateRevocationList", "objectClass", "cn")
    entries = ldif(plain.stdout)
    assert plain.returncode == 0 and len(entries) == 1, plain.stderr
    assert b"cRLDistributionPoint" in entries[0]["objectclass"]
    assert entries[0]["cn"][0].startswith(b"Demo EC Issuing CA part ")
    assert entries[0]["certificaterevocationlist;binary"] == [
        expected(pki, "ec-ca", "crl", url)]
    assert "deltarevocationlist;binary" not in entries[0]  # not asked for


@pytest_twisted.ensureDeferred
async def test_conditional_get_head_and_hostile_paths(live: dict[str, Any]) -> None:
    pki = live["pki"]
    curl = require_tool("curl")
    cert = next(c.load() for c in pki.certs if c.ca == "ec-ca")
    url = next(u for k, u in printed_urls(cert) if k == "crl" and u.startswith("http://"))
    r = await run(curl, "-sS", "-D", "-", "-o", "/dev/null", url)
    etag = next(line.split(b": ", 1)[1] for line in r.stdout.split(b"\r\n")
                if line.lower().startswith(b"etag:"))
    r = await run(curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                  b"If-None-Match: ".decode() + etag.decode(), url)
    assert r.stdout == b"304"
    r = await run(curl, "-sS", "-I", url)
    assert r.stdout.startswith(b"HTTP/1.1 200") and b"max-age=" in r.stdout
    base = f"http://127.0.0.1:{live['http']}"
    for path, status in (("/repository/ec-ca/../rsa-ca/part0.crl", b"400"),
                         ("/repository/ec-ca%2fpart0.crl", b"400"),
                         ("/repository/ec-ca/part0.crl?x=1", b"400"),
                         ("/repository/ec-ca/part9.crl", b"404"),
                         ("/repository/../../../etc/passwd", b"400")):
        r = await run(curl, "-sS", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}",
                      base + path)
        assert r.stdout == status, path
    # certpub's own paths stay: the full scope, and the CA certificate
    r = await run(curl, "-sS", "--fail", "-o", "-", base + "/crl/ec-ca.crl")
    assert r.stdout == der_of(pki.cas["ec-ca"].crl_path)
    r = await run(curl, "-sS", "--fail", "-o", "-", base + "/ca/ec-ca.crt")
    assert r.stdout == der_of(pki.cas["ec-ca"].cert_path)


@pytest_twisted.ensureDeferred
async def test_pyhanko_crl_only_through_the_partition(live: dict[str, Any]) -> None:
    pki = live["pki"]
    good = next(c for c in pki.certs if c.ca == "ec-ca" and c.state == "good"
                and c.serial != pki.crl2_revokes["ec-ca"])
    error = await threads.deferToThread(_pyhanko_validate, pki, good, "ec-ca", crl_only=True)
    assert error is None, repr(error)
    for part in (0, 1):  # a revoked certificate of each partition
        revoked = next(c for c in pki.certs if c.ca == "ec-ca" and c.state == "revoked"
                       and c.serial % 2 == part)
        error = await threads.deferToThread(_pyhanko_validate, pki, revoked, "ec-ca",
                                            crl_only=True)
        assert error is not None and type(error).__name__ == "RevokedError", repr(error)
        assert "CRL" in str(error), str(error)


async def fetch(live: dict[str, Any], url: str) -> tuple[bytes, bytes]:
    """(status code, body) of a GET with curl."""
    r = await run(require_tool("curl"), "-sS", "-o", "-", "-w", "\n%{http_code}", url)
    body, _, code = r.stdout.rpartition(b"\n")
    return code, body


def import_now(live: dict[str, Any], *paths: Path) -> None:
    from importer.run import import_paths

    import_paths(live["config"], list(paths), now=lambda: datetime.now(UTC), progress=None)
    d = live["feed"].poll()
    if d is not None:
        pytest_twisted.blockon(d)


@pytest_twisted.ensureDeferred
async def test_a_crl_whose_idp_names_another_cas_url_is_never_served_there(
        fresh: dict[str, Any]) -> None:
    """rsa-ca signs a CRL whose IDP names ec-ca's partition 0 URL: that URL keeps answering
    ec-ca's partition (the store resolves a URL within the CA that printed it)."""
    from server.demo.pki import make_crl

    pki = fresh["pki"]
    part0 = der_of(pki.cas["ec-ca"].scope_crl_paths[0])
    url = next(n.value for n in x509.load_der_x509_crl(part0).extensions.get_extension_for_class(
        x509.IssuingDistributionPoint).value.full_name if n.value.startswith("http://"))
    assert await fetch(fresh, url) == (b"200", part0)
    now = datetime.now(UTC).replace(microsecond=0)
    idp = x509.IssuingDistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)], relative_name=None,
        only_contains_user_certs=False, only_contains_ca_certs=False, only_some_reasons=None,
        indirect_crl=False, only_contains_attribute_certs=False)
    forged = make_crl(pki.cas["rsa-ca"], [(0x1234, now, "key_compromise")], 99, now,
                      now.replace(year=now.year + 1), [(idp, True)])
    path = fresh["pki"].root / "forged.pem"
    path.write_bytes(forged.public_bytes(Encoding.PEM))
    import_now(fresh, path)
    code, body = await fetch(fresh, url)
    assert body != forged.public_bytes(Encoding.DER)
    assert (code, body) in ((b"200", part0), (b"404", b"not found\n"))


@pytest_twisted.ensureDeferred
async def test_a_url_claimed_by_two_cas_is_served_by_neither(fresh: dict[str, Any]) -> None:
    """An rsa-ca certificate printing ec-ca's partition 1 URL: the URL is in conflict, 404."""
    from server.demo.pki import issue_certificate, write_pem

    pki = fresh["pki"]
    victim = next(c.load() for c in pki.certs if c.ca == "ec-ca" and c.serial % 2 == 1)
    url = next(u for k, u in printed_urls(victim) if k == "crl" and u.startswith("http://"))
    assert (await fetch(fresh, url))[0] == b"200"
    now = datetime.now(UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Claims Another URL")])
    cert = issue_certificate(pki.cas["rsa-ca"], name, ["claim@example.mo"], 0x77AA, now,
                             now.replace(year=now.year + 1), crl_url=url)
    path = pki.root / "claim.pem"
    write_pem(path, cert)
    import_now(fresh, path)
    assert await fetch(fresh, url) == (b"404", b"not found\n")


def test_ldap_url_query_is_what_ldapsearch_reads() -> None:
    url = ("ldap://h:1/CN=Demo%20EC%20Issuing%20CA%20part%201,OU=CRL,C=MO"
           "?certificateRevocationList;binary")
    cmd = ldap_search({"ldap": 1}, url)
    assert cmd[-3:] == ["CN=Demo EC Issuing CA part 1,OU=CRL,C=MO", "(objectClass=*)",
                        "certificateRevocationList;binary"]
    assert base64  # (ldif decodes base64 values)

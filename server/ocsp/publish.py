"""What the HTTP listener publishes besides OCSP: CA certificates, CRLs and an index page.

Strategy: pure functions from the configured CAs and store records to (status, headers,
body); the HTTP adapter only sends them. CA certificates come from the configuration (read
once per start or reload), CRLs from the store (the latest one the importer accepted).
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.utils import format_datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.ocsp.service import PublishedCa
from store.model import CaRecord

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]


def http_date(value: datetime) -> bytes:
    """RFC 9110 §5.6.7 IMF-fixdate."""
    return format_datetime(value.replace(microsecond=0), usegmt=True).encode()


def _etag(data: bytes) -> bytes:
    return b'"' + hashlib.sha256(data).hexdigest()[:32].encode() + b'"'


def not_found() -> Reply:
    return 404, [(b"Content-Type", b"text/plain; charset=utf-8")], b"not found\n"


def ca_certificate(ca: PublishedCa, pem: bool) -> Reply:
    """``/ca/<name>.crt`` (DER, RFC 5280 §4.2.2.1 caIssuers) or ``/ca/<name>.pem``."""
    if pem:
        cert = x509.load_der_x509_certificate(ca.der)
        body = cert.public_bytes(serialization.Encoding.PEM)
        ctype = b"application/x-pem-file"
    else:
        body, ctype = ca.der, b"application/pkix-cert"
    return 200, [(b"Content-Type", ctype), (b"ETag", _etag(body)),
                 (b"Cache-Control", b"public, max-age=3600")], body


def crl(record: CaRecord | None) -> Reply:
    """``/crl/<name>.crl``: the latest CRL of the CA (RFC 5280 §4.2.1.13), DER."""
    if record is None or record.crl_der is None:
        return not_found()
    headers: Headers = [(b"Content-Type", b"application/pkix-crl"),
                        (b"ETag", _etag(record.crl_der))]
    if record.crl_this_update is not None:
        headers.append((b"Last-Modified", http_date(record.crl_this_update)))
    if record.crl_next_update is not None:
        headers.append((b"Expires", http_date(record.crl_next_update)))
    return 200, headers, record.crl_der


def index_page(cas: Sequence[PublishedCa], records: Mapping[str, CaRecord | None],
               ocsp_paths: Sequence[str]) -> Reply:
    """``/``: a small human-readable page listing the CAs served and their URLs."""
    rows = []
    for ca in cas:
        rec = records.get(ca.name)
        number = "-" if rec is None or rec.crl_number is None else str(rec.crl_number)
        nxt = ("-" if rec is None or rec.crl_next_update is None
               else rec.crl_next_update.strftime("%Y-%m-%d %H:%M:%SZ"))
        n = html.escape(ca.name)
        rows.append(
            f"<tr><td>{n}</td><td>{html.escape(ca.subject)}</td><td><code>{ca.sha256}</code></td>"
            f'<td>{number}</td><td>{nxt}</td><td><a href="/ca/{n}.crt">{n}.crt</a> '
            f'<a href="/ca/{n}.pem">{n}.pem</a> <a href="/crl/{n}.crl">{n}.crl</a></td></tr>')
    paths = ", ".join(f"<code>{html.escape(p)}</code>" for p in ocsp_paths)
    body = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>certpub repository</title>"
        "</head><body><h1>Certificate repository</h1>"
        f"<p>OCSP (RFC 6960): POST <code>application/ocsp-request</code> to {paths}, or GET"
        " the path followed by the base64 request.</p>"
        "<table border=\"1\"><tr><th>CA</th><th>subject</th><th>SHA-256 fingerprint</th>"
        "<th>CRL number</th><th>CRL next update</th><th>files</th></tr>"
        + "".join(rows) + "</table></body></html>\n"
    ).encode()
    return 200, [(b"Content-Type", b"text/html; charset=utf-8"),
                 (b"Cache-Control", b"no-cache")], body

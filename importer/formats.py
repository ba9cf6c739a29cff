"""Input formats: what a file holds, decided by content (PEM, DER, PKCS#7/CMS bundles).

Strategy: PEM blocks are found by their labels; DER is sniffed from its first tags
(certificate, CRL or PKCS#7, RFC 5280 §4.1, §5.1, RFC 5652 §3), so file names never matter.
``extract`` returns ("cert" | "crl", DER) pairs or raises ``FileRejected`` with a reason in
plain words; it is pure (no store, no trust decision) and runs in the worker processes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from asn1crypto import cms
from asn1crypto import core as asn1core

MAX_FILE_BYTES = 256 * 1024 * 1024


class FileRejected(ValueError):
    """A file, or one object in it, that is not imported; str() says why in plain words."""


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 #]+)-----(.*?)-----END \1-----", re.DOTALL)
_PEM_KINDS = {
    b"CERTIFICATE": "cert", b"X509 CERTIFICATE": "cert", b"TRUSTED CERTIFICATE": "cert",
    b"X509 CRL": "crl", b"CRL": "crl",
    b"PKCS7": "p7", b"PKCS #7 SIGNED DATA": "p7", b"CMS": "p7",
}
_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"
_END_CERT = b"-----END CERTIFICATE-----"
_NOT_RECOGNISED = "not a certificate, CRL or PKCS#7 bundle (PEM or DER)"


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the BER element at pos."""
    if pos + 2 > len(data):
        raise FileRejected(_NOT_RECOGNISED)
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        end = pos + first
    elif first == 0x80:
        return tag, pos, len(data)  # BER indefinite length (PKCS#7 from some tools)
    else:
        n = first & 0x7F
        if n > 4 or pos + n > len(data):
            raise FileRejected(_NOT_RECOGNISED)
        end = pos + n + int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if end > len(data):
        raise FileRejected("truncated: a DER length runs past the end of the data")
    return tag, pos, end


def _sniff(der: bytes) -> str:
    """"cert", "crl" or "p7" from the first tags (RFC 5280 §4.1, §5.1; RFC 5652 §3)."""
    tag, start, _ = _tlv(der, 0)
    if tag != 0x30:
        raise FileRejected(_NOT_RECOGNISED)
    tag, pos, inner_end = _tlv(der, start)
    if tag == 0x06:
        return "p7"  # ContentInfo starts with its contentType OID
    if tag != 0x30:
        raise FileRejected(_NOT_RECOGNISED)
    tags: list[int] = []
    while pos < inner_end and len(tags) < 4:
        t, _, pos = _tlv(der, pos)
        tags.append(t)
    if tags[:1] == [0xA0]:
        return "cert"  # [0] version: only a TBSCertificate has it
    # An optional INTEGER (serial or CRL version), signature AlgorithmIdentifier, issuer
    # Name; then Validity (SEQUENCE) in a certificate, thisUpdate (a Time) in a CRL.
    i = 3 if tags[:1] == [0x02] else 2
    if len(tags) > i and tags[i] in (0x17, 0x18):
        return "crl"
    if len(tags) > i and tags[i] == 0x30:
        return "cert"
    raise FileRejected(_NOT_RECOGNISED)


def _pkcs7(der: bytes, where: str) -> list[tuple[str, bytes]]:
    """Certificates and CRLs of a PKCS#7/CMS SignedData bundle (RFC 5652 §5.1)."""
    out: list[tuple[str, bytes]] = []
    try:
        info = cms.ContentInfo.load(der)
        ctype = info["content_type"].native
        if ctype != "signed_data":
            raise FileRejected(f"{where} is a PKCS#7 {ctype} message, not a certificate bundle")
        signed = info["content"]
        for choice in [] if isinstance(signed["certificates"], asn1core.Void) \
                else signed["certificates"]:
            if choice.name != "certificate":
                raise FileRejected(f"{where} holds a {choice.name}, not an X.509 certificate")
            out.append(("cert", choice.chosen.dump()))
        for choice in [] if isinstance(signed["crls"], asn1core.Void) else signed["crls"]:
            if choice.name != "crl":
                raise FileRejected(f"{where} holds revocation information other than a CRL")
            out.append(("crl", choice.chosen.dump()))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        if isinstance(exc, FileRejected):
            raise
        raise FileRejected(f"{where} is not a valid PKCS#7 bundle ({exc})") from exc
    if not out:
        raise FileRejected(f"{where} is a PKCS#7 bundle without certificates or CRLs")
    return out


def _der_objects(data: bytes, kind: str | None, where: str) -> list[tuple[str, bytes]]:
    """The DER objects one after another in data (``cat a.der b.der`` works too)."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 16 and not data[pos:].strip():
            break  # a trailing newline after DER
        if data[pos] != 0x30:  # every object we take is a SEQUENCE
            raise FileRejected(_NOT_RECOGNISED)
        _, _, end = _tlv(data, pos)
        obj = data[pos:end]
        k = kind or _sniff(obj)
        if k == "p7":
            out += _pkcs7(obj, where)
        else:
            out.append((k, obj))
        pos = end
    return out


def extract(data: bytes) -> list[tuple[str, bytes]]:
    """("cert" | "crl", DER) of every object in a file, recognised by content, not name."""
    if not data.strip():
        raise FileRejected("the file is empty")
    if b"-----BEGIN " not in data:
        return _der_objects(data, None, "the file")
    if data.startswith(_BEGIN_CERT) and data.count(b"-----BEGIN ") == 1:
        # The usual file: one PEM certificate. What the loop below does for it, without the
        # regular expression (it scans the whole file for a BEGIN label and its END).
        end = data.find(_END_CERT, len(_BEGIN_CERT))
        if end > 0:
            try:
                der = base64.b64decode(data[len(_BEGIN_CERT):end])
            except binascii.Error as exc:
                raise FileRejected("PEM block 1 (CERTIFICATE) is not valid base64") from exc
            try:
                return _der_objects(der[:_tlv(der, 0)[2]], "cert", "PEM block 1")
            except FileRejected as exc:
                raise FileRejected(f"PEM block 1 (CERTIFICATE): {exc}") from exc
    out: list[tuple[str, bytes]] = []
    blocks = 0
    for blocks, m in enumerate(_PEM_BLOCK.finditer(data), start=1):
        label = m.group(1)
        kind = _PEM_KINDS.get(label)
        where = f"PEM block {blocks}"
        if kind is None:
            raise FileRejected(f"{where} is a {label.decode()}, which certpub does not import")
        try:
            der = base64.b64decode(m.group(2))
        except binascii.Error as exc:
            raise FileRejected(f"{where} ({label.decode()}) is not valid base64") from exc
        try:
            # "TRUSTED CERTIFICATE" carries OpenSSL trust settings after the certificate.
            out += _der_objects(der[:_tlv(der, 0)[2]] if kind == "cert" else der,
                                None if kind == "p7" else kind, where)
        except FileRejected as exc:
            raise FileRejected(f"{where} ({label.decode()}): {exc}") from exc
    if blocks < data.count(b"-----BEGIN "):
        raise FileRejected(f"PEM block {blocks + 1} has no END line (the file is truncated?)")
    return out




def read_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes, at most limit + 1 of them (more than limit means "too large").

    Plain ``os.read`` calls: ``open(path, "rb").read(limit + 1)`` allocates a buffer of
    limit + 1 bytes first (256 MiB, ~20 µs of page mapping for every small file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        total = 0
        while total <= limit:
            part = os.read(fd, min(1 << 16 if not parts else 1 << 22, limit + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_ca_certificate(path: Path) -> bytes:
    """DER of the first certificate in a configured CA file (PEM or DER)."""
    objs = extract(path.read_bytes())
    for kind, der in objs:
        if kind == "cert":
            return der
    raise FileRejected(f"{path} holds no certificate")



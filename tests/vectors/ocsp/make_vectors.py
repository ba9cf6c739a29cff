"""Regenerate the OCSP request vectors of this folder (see README.md). Needs `openssl`.

    /tmp/venv/bin/python tests/vectors/ocsp/make_vectors.py

Keys and certificates are made fresh each run, so every vector changes; the tests read the
expected hashes from ca.pem and the serials from ee1.pem / ee2.pem, never from constants.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from asn1crypto import core, ocsp

HERE = Path(__file__).resolve().parent


def run(*args: str) -> None:
    subprocess.run(args, check=True, cwd=HERE, stdout=subprocess.DEVNULL)


def openssl_vectors(tmp: Path) -> None:
    cnf = tmp / "ext.cnf"
    cnf.write_text(
        "[ca]\nbasicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "[ee]\nbasicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n")
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(tmp / "ca.key"), "-out", "ca.pem", "-days", "36500",
        "-subj", "/C=MO/O=certpub vectors/CN=Vector CA", "-extensions", "ca",
        "-config", str(cnf))
    for name, serial in (("ee1", "0x0102030405060708090a0b0c0d0e0f10"), ("ee2", "0x2a")):
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(tmp / f"{name}.key"), "-out", str(tmp / f"{name}.csr"),
            "-subj", f"/C=MO/CN=Vector {name}")
        run("openssl", "x509", "-req", "-in", str(tmp / f"{name}.csr"), "-CA", "ca.pem",
            "-CAkey", str(tmp / "ca.key"), "-set_serial", serial, "-days", "36500",
            "-extfile", str(cnf), "-extensions", "ee", "-out", f"{name}.pem")
    base = ("openssl", "ocsp", "-issuer", "ca.pem")
    run(*base, "-cert", "ee1.pem", "-no_nonce", "-reqout", "req-sha1-single.der")
    for digest in ("sha256", "sha384", "sha512"):
        run(*base, f"-{digest}", "-cert", "ee1.pem", "-no_nonce", "-reqout",
            f"req-{digest}-single.der")
    run(*base, "-cert", "ee1.pem", "-cert", "ee2.pem", "-no_nonce", "-reqout",
        "req-sha1-multi.der")
    run(*base, "-cert", "ee1.pem", "-reqout", "req-sha1-nonce.der")
    run(*base, "-cert", "ee1.pem", "-no_nonce", "-signer", "ee2.pem", "-signkey",
        str(tmp / "ee2.key"), "-reqout", "req-signed.der")
    run(*base, "-serial", "0x7fffffff", "-no_nonce", "-reqout", "req-unissued-serial.der")


_NONCE_OID = core.ObjectIdentifier("1.3.6.1.5.5.7.48.1.2").dump()


def _len(n: int) -> bytes:
    return bytes([n]) if n < 128 else bytes([0x81, n]) if n < 256 else bytes([0x82, n >> 8, n & 255])


def _octets(value: bytes) -> bytes:
    return b"\x04" + _len(len(value)) + value


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _len(len(value)) + value


def with_nonce(base: bytes, value: bytes, *, wrap: bool = True) -> bytes:
    """base (a request without extensions) with a nonce extension added, in raw DER
    (asn1crypto refuses to build a nonce that is not an OCTET STRING)."""
    request_list = ocsp.OCSPRequest.load(base)["tbs_request"]["request_list"].dump()
    inner = _octets(value) if wrap else value
    ext = _tlv(0x30, _NONCE_OID + _octets(inner))
    tbs = _tlv(0x30, request_list + _tlv(0xA2, _tlv(0x30, ext)))
    return _tlv(0x30, tbs)


def synthetic_vectors() -> None:
    single = (HERE / "req-sha1-single.der").read_bytes()
    multi = ocsp.OCSPRequest.load((HERE / "req-sha1-multi.der").read_bytes())
    write = lambda name, data: (HERE / name).write_bytes(data)
    write("bad-not-der.der", b"GET / HTTP/1.0\r\n\r\n")
    write("bad-truncated.der", single[:-5])
    write("bad-trailing-garbage.der", single + b"\x00\x00")
    write("bad-empty-request-list.der", ocsp.OCSPRequest(
        {"tbs_request": {"request_list": []}}).dump())
    write("bad-wrong-outer-type.der", core.OctetString(single).dump())
    write("bad-nonce-empty.der", with_nonce(single, b""))
    write("bad-nonce-129.der", with_nonce(single, b"\x01" * 129))
    write("bad-nonce-not-octet-string.der", with_nonce(single, b"\x01" * 16, wrap=False))
    write("req-nonce-1.der", with_nonce(single, b"\x07"))
    write("req-nonce-128.der", with_nonce(single, bytes(range(128))))
    one = multi["tbs_request"]["request_list"][0]
    write("req-101-certids.der", ocsp.OCSPRequest(
        {"tbs_request": {"request_list": [one] * 101}}).dump())
    write("req-100-certids.der", ocsp.OCSPRequest(
        {"tbs_request": {"request_list": [one] * 100}}).dump())


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        openssl_vectors(Path(tmp))
    synthetic_vectors()
    return 0


if __name__ == "__main__":
    sys.exit(main())

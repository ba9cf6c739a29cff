"""Bulk test data: one CA, N subscriber certificates (one reused key), a CRL, index.txt, config.

Usage: python bench/gen_certs.py OUT_DIR N [--files | --bundle] [--revoked-percent 3] [--urls]

Writes OUT_DIR/ca.pem, ca.key, ocsp.pem, ocsp.key, certs/NNN.pem (one file each, --files) or
bundle.pem (all in one file, --bundle), crl.pem, index.txt and certpub.toml. Prints the time
it took. Serials are sequential from 0x1000, e-mail user<i>@bench.example, subjects
cn=User <i>,ou=Bench,o=Bench,c=MO. --urls adds what a real CA prints: CRL distribution points
(an http:// and an ldap:// URL, one of four partitions by serial), a freshest CRL and an AIA
caIssuers URL (RFC 5280 §4.2.1.13, §4.2.1.15, §4.2.2.1), for the URL learning's cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Bench"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _url_extensions(part: int) -> list[x509.ExtensionType]:
    uri = x509.UniformResourceIdentifier
    ldap = (f"ldap://dir.bench.example/cn=Bench%20CA%20part{part},ou=CRL,o=Bench,c=MO"
            "?certificateRevocationList;binary")
    return [
        x509.CRLDistributionPoints([x509.DistributionPoint(
            [uri(f"http://crl.bench.example/part{part}.crl"), uri(ldap)], None, None, None)]),
        x509.FreshestCRL([x509.DistributionPoint(
            [uri(f"http://crl.bench.example/part{part}-delta.crl")], None, None, None)]),
        x509.AuthorityInformationAccess([x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
            uri("http://www.bench.example/bench-ca.crt"))]),
    ]


def generate(out: Path, n: int, *, bundle: bool, revoked_percent: float,
             urls: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    fd = os.open(out / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, _key_pem(ca_key))
    os.close(fd)
    ocsp_key = ec.generate_private_key(ec.SECP256R1())
    ocsp = (x509.CertificateBuilder().subject_name(_name("Bench OCSP")).issuer_name(ca_name)
            .public_key(ocsp_key.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            .add_extension(x509.OCSPNoCheck(), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (out / "ocsp.pem").write_bytes(ocsp.public_bytes(serialization.Encoding.PEM))
    fd = os.open(out / "ocsp.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, _key_pem(ocsp_key))
    os.close(fd)

    sub_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    certs_dir = out / "certs"
    certs_dir.mkdir(exist_ok=True)
    bundle_file = open(out / "bundle.pem", "wb") if bundle else None
    index_lines = []
    revoked = []
    every = int(100 / revoked_percent) if revoked_percent > 0 else 0
    revoked_at = now - timedelta(minutes=10)  # the same in index.txt and in the CRL
    start = time.perf_counter()
    for i in range(n):
        serial = 0x1000 + i
        cert = (x509.CertificateBuilder().subject_name(_name(f"User {i}")).issuer_name(ca_name)
                .public_key(sub_key).serial_number(serial)
                .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1095))
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(f"user{i}@bench.example")]),
                               critical=False)
                .add_extension(aki, critical=False))
        if urls:
            for ext in _url_extensions(i % 4):
                cert = cert.add_extension(ext, critical=False)
        cert = cert.sign(ca_key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if bundle_file is not None:
            bundle_file.write(pem)
        else:
            (certs_dir / f"{serial:X}.pem").write_bytes(pem)
        exp = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
        if every and i % every == every - 1:
            revoked.append(serial)
            index_lines.append(f"R\t{exp}\t{revoked_at.strftime('%y%m%d%H%M%SZ')},keyCompromise\t{serial:X}\tunknown\t/C=MO/O=Bench/OU=Bench/CN=User {i}")
        else:
            index_lines.append(f"V\t{exp}\t\t{serial:X}\tunknown\t/C=MO/O=Bench/OU=Bench/CN=User {i}")
        if i and i % 10000 == 0:
            print(f"  {i} certificates, {i / (time.perf_counter() - start):.0f}/s", file=sys.stderr)
    if bundle_file is not None:
        bundle_file.close()
    (out / "index.txt").write_text("\n".join(index_lines) + "\n")
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_name)
           .last_update(now - timedelta(minutes=5)).next_update(now + timedelta(days=7))
           .add_extension(x509.CRLNumber(1), critical=False))
    for serial in revoked:
        crl = crl.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
    (out / "crl.pem").write_bytes(crl.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    (out / "spool").mkdir(exist_ok=True)
    (out / "certpub.toml").write_text(f"""[store]
path = "{out}/store.sqlite3"

[import]
spool = ["{out}/spool"]

[[import.openssl]]
ca = "bench"
index = "{out}/index.txt"
certs_dir = "{certs_dir}"

[[ca]]
name = "bench"
certificate = "{out}/ca.pem"
[ca.ocsp]
signer_certificate = "{out}/ocsp.pem"
signer_key = "{out}/ocsp.key"

[ldap]
listen = ["tcp:0:interface=127.0.0.1"]

[http]
listen = ["tcp:0:interface=127.0.0.1"]
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--bundle", action="store_true", help="one PEM file instead of one per certificate")
    parser.add_argument("--revoked-percent", type=float, default=3.0)
    parser.add_argument("--urls", action="store_true",
                        help="CRL distribution points, freshest CRL and caIssuers URLs")
    args = parser.parse_args()
    t0 = time.perf_counter()
    generate(args.out.resolve(), args.n, bundle=args.bundle, revoked_percent=args.revoked_percent,
             urls=args.urls)
    print(f"generated {args.n} certificates in {time.perf_counter() - t0:.1f} s into {args.out}")


if __name__ == "__main__":
    main()

"""The public data of a ``bench/gen_certs.py`` output directory as LDIF, for slapd.

Usage: python bench/gen_ldif.py DATA_DIR [OUT.ldif]   (default DATA_DIR/bench.ldif)

Writes the entries certpub publishes for the same data, at the same DNs: c=MO (country),
o=Bench,c=MO (organization), ou=Bench,o=Bench,c=MO (organizationalUnit), the CA at
cn=Bench CA,o=Bench,c=MO (applicationProcess + pkiCA with cACertificate;binary and
certificateRevocationList;binary) and one inetOrgPerson per subscriber certificate at
cn=User <i>,ou=Bench,o=Bench,c=MO with cn, sn, mail and userCertificate;binary — omitted for
a certificate that index.txt marks revoked, as certpub omits it. Reads DATA_DIR/certs/*.pem or
DATA_DIR/bundle.pem. Prints the number of entries and the time it took.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID


def _b64(data: bytes) -> str:
    """An LDIF base64 value, folded at 76 columns (RFC 2849)."""
    text = base64.b64encode(data).decode("ascii")
    return "\n ".join(text[i:i + 76] for i in range(0, len(text), 76))


def _pems(data: Path) -> Iterator[x509.Certificate]:
    certs_dir = data / "certs"
    files = sorted(certs_dir.glob("*.pem"), key=lambda p: int(p.stem, 16)) if certs_dir.is_dir() else []
    if files:
        for path in files:
            yield x509.load_pem_x509_certificate(path.read_bytes())
        return
    bundle = data / "bundle.pem"
    if bundle.exists():
        yield from x509.load_pem_x509_certificates(bundle.read_bytes())


def _revoked(data: Path) -> set[int]:
    index = data / "index.txt"
    if not index.exists():
        return set()
    out = set()
    for line in index.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 4 and fields[0] == "R":
            out.add(int(fields[3], 16))
    return out


def write_ldif(data: Path, out: Path) -> int:
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    crl_path = data / "crl.pem"
    revoked = _revoked(data)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        f.write("dn: c=MO\nobjectClass: top\nobjectClass: country\nc: MO\n\n"
                "dn: o=Bench,c=MO\nobjectClass: top\nobjectClass: organization\no: Bench\n\n"
                "dn: ou=Bench,o=Bench,c=MO\nobjectClass: top\nobjectClass: organizationalUnit\n"
                "ou: Bench\n\n")
        f.write("dn: cn=Bench CA,o=Bench,c=MO\nobjectClass: top\nobjectClass: applicationProcess\n"
                f"objectClass: pkiCA\ncn: Bench CA\ncACertificate;binary:: {_b64(ca.public_bytes(Encoding.DER))}\n")
        if crl_path.exists():
            crl = x509.load_pem_x509_crl(crl_path.read_bytes())
            f.write(f"certificateRevocationList;binary:: {_b64(crl.public_bytes(Encoding.DER))}\n")
        f.write("\n")
        n = 4
        for cert in _pems(data):
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                mails = san.get_values_for_type(x509.RFC822Name)
            except x509.ExtensionNotFound:
                mails = []
            lines = [f"dn: cn={cn},ou=Bench,o=Bench,c=MO", "objectClass: top", "objectClass: person",
                     "objectClass: organizationalPerson", "objectClass: inetOrgPerson",
                     f"cn: {cn}", f"sn: {cn.split()[-1]}"]
            lines += [f"mail: {m}" for m in mails]
            if cert.serial_number not in revoked:
                lines.append(f"userCertificate;binary:: {_b64(cert.public_bytes(Encoding.DER))}")
            f.write("\n".join(lines) + "\n\n")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    args = parser.parse_args()
    out = args.out or args.data / "bench.ldif"
    t0 = time.perf_counter()
    n = write_ldif(args.data, out)
    print(f"wrote {n} entries to {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

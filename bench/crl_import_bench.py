"""Import of one large CRL (a full CRL, or one partition of a partitioned CRL), A/B.

Usage: python bench/crl_import_bench.py OUT [--entries 300000] [--rounds 3]
                                            [--trees NAME=DIR ...] [--kinds full,partition]

Writes OUT/ca.pem and a CRL of --entries entries twice (OUT/full.crl without an issuing
distribution point, OUT/partition.crl with one naming http://crl.bench.example/part0.crl;
the entries are built as DER by hand and signed once, seconds instead of minutes), then for
each round, each tree and each kind imports that CRL with ``certpub import`` (``python -m
server.cli`` run inside the tree, so a checkout of another branch can be compared) into a
fresh SQLite store holding only the CA, and prints wall seconds, CPU seconds and the peak RSS
of the process tree (``bench.import_bench.measure``). Trees and kinds alternate within each
round (the machine is shared: A/B in one run). Default trees: this checkout as "branch".
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.import_bench import measure

IDP_URL = "http://crl.bench.example/part0.crl"


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _time(moment: datetime) -> bytes:
    return _der(0x17, moment.strftime("%y%m%d%H%M%SZ").encode())


def write_crls(out: Path, entries: int) -> None:
    """ca.pem, full.crl and partition.crl (DER) into out."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "CRL Bench CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(1)
          .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    when = _time(now - timedelta(days=1))
    reason = _der(0x30, _der(0x30, b"\x06\x03\x55\x1d\x15" + _der(0x04, b"\x0a\x01\x01")))
    revoked = b"".join(_der(0x30, _int(0x1000 + i) + when + (reason if i % 3 == 0 else b""))
                       for i in range(entries))
    sig_alg = _der(0x30, b"\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02")  # ecdsa-with-SHA256
    issuer = name.public_bytes()
    number = _der(0x30, b"\x06\x03\x55\x1d\x14" + _der(0x04, _int(7)))
    idp = x509.IssuingDistributionPoint([x509.UniformResourceIdentifier(IDP_URL)], None, False,
                                        False, None, False, False).public_bytes()
    idp_ext = _der(0x30, b"\x06\x03\x55\x1d\x1c" + b"\x01\x01\xff" + _der(0x04, idp))
    for label, exts in (("full", number), ("partition", number + idp_ext)):
        tbs = _der(0x30, _int(1) + sig_alg + issuer + _time(now - timedelta(hours=1))
                   + _time(now + timedelta(days=7)) + _der(0x30, revoked)
                   + _der(0xA0, _der(0x30, exts)))
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        crl = _der(0x30, tbs + sig_alg + _der(0x03, b"\x00" + signature))
        x509.load_der_x509_crl(crl)  # well-formed
        (out / f"{label}.crl").write_bytes(crl)


def run(tree: Path, out: Path, kind: str, work: Path) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "certpub.toml"
    config.write_text(f'[store]\npath = "{work}/store.sqlite3"\n\n[import]\n'
                      f'spool = ["{work}/spool"]\n\n[[ca]]\nname = "bench"\n'
                      f'certificate = "{out}/ca.pem"\n')
    cmd = ["sh", "-c", f'cd "{tree}" && exec "{sys.executable}" -m server.cli import'
                       f' --config "{config}" "{out}/{kind}.crl"']
    r = measure(cmd)
    if "revocations " not in str(r["output"]):
        raise SystemExit(f"no summary line:\n{r['output']}")
    r["revocations"] = int(str(r["output"]).split("revocations ", 1)[1].split(",", 1)[0])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--entries", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trees", nargs="*", default=[f"branch={ROOT}"],
                    help="NAME=DIR of certpub checkouts to compare (e.g. main=/work/main)")
    ap.add_argument("--kinds", default="full,partition")
    args = ap.parse_args()
    out = args.out.resolve()
    if not (out / "partition.crl").exists():
        write_crls(out, args.entries)
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1])) for t in args.trees]
    kinds = args.kinds.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        order = trees if rnd % 2 == 0 else list(reversed(trees))
        for name, tree in order:
            for kind in kinds:
                r = run(tree, out, kind, out / f"work-{name}-{kind}")
                results.setdefault((name, kind), []).append(r)
                print(f"round {rnd + 1} {name:8} {kind:9} {r['seconds']:6.2f} s"
                      f" cpu {r['cpu_s']:6.2f} s peak {r['peak_rss_mib']:6.0f} MiB"
                      f" revocations {r['revocations']}", flush=True)
    print("median over rounds:")
    for (name, kind), rs in results.items():
        print(f"  {name:8} {kind:9} {statistics.median(r['seconds'] for r in rs):6.2f} s"
              f"  peak {statistics.median(r['peak_rss_mib'] for r in rs):6.0f} MiB")


if __name__ == "__main__":
    main()

"""``certpub demo``: build a demo PKI, import it, serve it, and print commands that work."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "demo.json"


def _now() -> datetime:
    return datetime.now(UTC)


def _directory_dn(pem_path: Path) -> str:
    """The DN under which the directory publishes a certificate's subject."""
    from asn1crypto import pem
    from asn1crypto import x509 as asn1x509

    from store import names

    _, _, der = pem.unarmor(Path(pem_path).read_bytes())
    return str(names.from_x509(asn1x509.Certificate.load(der).subject).public())


def _pick(pki: Any) -> dict[str, Any]:
    """Example certificates for the printed commands (saved so a rerun prints the same)."""
    def first(state: str, ca: str | None = None) -> Any:
        return next(c for c in pki.certs if c.state == state and c.emails and (ca is None or c.ca == ca))

    good = first("good", "rsa-ca")
    revoked = first("revoked")
    crl2_ca, crl2_serial = next(iter(pki.crl2_revokes.items()))
    crl2_cert = next(c for c in pki.certs if c.ca == crl2_ca and c.serial == crl2_serial)

    def info(c: Any) -> dict[str, Any]:
        return {"ca": c.ca, "serial": c.serial, "path": str(c.path), "email": c.emails[0],
                "subject": c.subject_rfc4514, "reason": c.reason,
                "directory_dn": _directory_dn(c.path)}

    return {
        "good": info(good),
        "revoked": info(revoked),
        "crl2": {**info(crl2_cert), "crl": str(pki.cas[crl2_ca].crl_path.with_name("crl-2.pem"))},
        "root": str(pki.cas["root"].cert_path) if "root" in pki.cas else str(pki.root / "ca" / "root.pem"),
        "cas": {name: str(ca.cert_path) for name, ca in pki.cas.items()},
        "spool": str(pki.spool_dir),
        "config": str(pki.config_path),
    }


def commands(m: dict[str, Any], ldap_port: int, http_port: int) -> str:
    q = shlex.quote
    lines = [
        "Try these (copy and paste):",
        "",
        "# the certificate of a subscriber, by e-mail, as Thunderbird asks for it",
        f"ldapsearch -x -H ldap://127.0.0.1:{ldap_port} -b 'c=MO' "
        f"{q('(mail=' + m['good']['email'] + ')')} 'userCertificate;binary'",
        "",
        "# every certificate of that subscriber, each marked valid / revoked / expired",
        f"ldapsearch -x -H ldap://127.0.0.1:{ldap_port} -s one -b {q(m['good']['directory_dn'])} "
        "certpubStatus certpubRevocationReason certpubNotAfter",
        "",
        "# OCSP: a good certificate",
        f"openssl ocsp -issuer {q(m['cas'][m['good']['ca']])} -cert {q(m['good']['path'])} "
        f"-CAfile {q(m['root'])} -url http://127.0.0.1:{http_port}/ocsp -resp_text | grep -E 'Cert Status|Response verify|Reason'",
        "",
        f"# OCSP: a revoked certificate (reason {m['revoked']['reason']})",
        f"openssl ocsp -issuer {q(m['cas'][m['revoked']['ca']])} -cert {q(m['revoked']['path'])} "
        f"-CAfile {q(m['root'])} -url http://127.0.0.1:{http_port}/ocsp",
        "",
        "# watch a revocation appear: drop a newer CRL into the spool (write, then rename)",
        f"openssl ocsp -issuer {q(m['cas'][m['crl2']['ca']])} -cert {q(m['crl2']['path'])} "
        f"-CAfile {q(m['root'])} -url http://127.0.0.1:{http_port}/ocsp     # good",
        f"cp {q(m['crl2']['crl'])} {q(m['spool'] + '/.crl-2.tmp')} && "
        f"mv {q(m['spool'] + '/.crl-2.tmp')} {q(m['spool'] + '/crl-2.pem')}",
        "sleep 2",
        f"openssl ocsp -issuer {q(m['cas'][m['crl2']['ca']])} -cert {q(m['crl2']['path'])} "
        f"-CAfile {q(m['root'])} -url http://127.0.0.1:{http_port}/ocsp     # revoked",
        f"ldapsearch -x -H ldap://127.0.0.1:{ldap_port} -s one -b {q(m['crl2']['directory_dn'])} "
        "certpubStatus certpubRevocationReason",
        "",
        "# the CA certificate and CRL over HTTP",
        f"curl -s http://127.0.0.1:{http_port}/crl/{m['good']['ca']}.crl | openssl crl -inform DER -noout -text | head",
        "",
        f"# store status:  certpub status --config {q(m['config'])}",
    ]
    return "\n".join(lines)


def prepare(folder: Path, ldap_port: int, http_port: int, fresh: bool) -> dict[str, Any]:
    """Build the PKI (unless already there) and import it; returns the manifest."""
    from server.config import load_config
    from server.demo.pki import build_demo_pki
    from importer.run import import_openssl, import_paths

    manifest_path = folder / MANIFEST
    if fresh and folder.exists():
        shutil.rmtree(folder)
    if manifest_path.exists():
        m: dict[str, Any] = json.loads(manifest_path.read_text())
        if m.get("ports") != [ldap_port, http_port]:
            raise SystemExit(
                f"certpub: {folder} was built for ports {m.get('ports')}; use --fresh to rebuild"
            )
        print(f"Using the demo PKI in {folder} (--fresh rebuilds it)", file=sys.stderr)
        return m
    print(f"Building a demo PKI in {folder} ...", file=sys.stderr)
    pki = build_demo_pki(folder, ldap_port=ldap_port, http_port=http_port)
    m = _pick(pki)
    m["ports"] = [ldap_port, http_port]
    config = load_config(pki.config_path)
    summary = import_openssl(config, now=_now, progress=sys.stderr)
    print(summary.line(), file=sys.stderr)
    crls = [ca.crl_path for ca in pki.cas.values() if ca.crl_path is not None]
    summary = import_paths(config, crls, now=_now, progress=sys.stderr)
    print(summary.line(), file=sys.stderr)
    manifest_path.write_text(json.dumps(m, indent=2, ensure_ascii=False))
    return m


def run_demo(folder: Path, *, ldap_port: int, http_port: int, serve: bool, fresh: bool) -> int:
    """The whole demo; serving runs until Ctrl-C."""
    from server.config import load_config

    folder = folder.resolve()
    m = prepare(folder, ldap_port, http_port, fresh)
    config = load_config(Path(m["config"]))
    from server.cli import cmd_status

    cmd_status(type("A", (), {"config": m["config"]})())  # type: ignore[arg-type]
    print()
    print(commands(m, ldap_port, http_port))
    print(flush=True)
    if not serve:
        return 0
    from importer.spool import run_daemon

    stop = threading.Event()
    daemon = threading.Thread(
        target=run_daemon, kwargs={"config": config, "now": _now, "stop": stop}, daemon=True,
        name="importd",
    )
    from server.serve import serve as serve_forever

    print(f"Serving LDAP on 127.0.0.1:{ldap_port} and HTTP on 127.0.0.1:{http_port}; "
          f"import daemon watching {m['spool']}. Ctrl-C stops.", flush=True)
    daemon.start()
    try:
        return serve_forever(config, Path(m["config"]))
    finally:
        stop.set()
        daemon.join(timeout=10)

"""``certpub demo``: build a demo PKI, import it, serve it, and print commands that work."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


def _ldap_url_dn(pem_path: Path) -> str:
    """The DN of the first ldap:// URL in a certificate's CRL distribution points."""
    from urllib.parse import unquote, urlsplit

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    url = next(n.value for p in points for n in p.full_name or ()
               if n.value.startswith("ldap://"))
    return unquote(urlsplit(url).path[1:])


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

    part_ca = next(ca for ca in pki.cas.values() if ca.scope_crl_paths)
    part_cert = next(c for c in pki.certs if c.ca == part_ca.name and c.state == "good")
    return {
        "partitioned": {**info(part_cert), "dp_dn": _ldap_url_dn(part_cert.path)},
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
    web = f"http://127.0.0.1:{http_port}"
    lines = [
        f"The search page, in a browser: {web}/",
        f"  by e-mail:        {web}/?q={quote(m['good']['email'])}",
        f"  by name (CJK):    {web}/?q={quote('陳大文')}",
        f"  by name (accent): {web}/?q={quote('João')}&lang=pt",
        f"  a revoked one:    {web}/cert/{m['revoked']['ca']}/{m['revoked']['serial']:x}",
        f"  as JSON:          {web}/api/v1/search?q={quote(m['good']['email'])}",
        "",
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
        *partition_commands(m, ldap_port),
        "# the store: certificates per CA and status, CRLs, last import",
        f"{certpub_command()} status --config {q(m['config'])}",
    ]
    return "\n".join(lines)


def partition_commands(m: dict[str, Any], ldap_port: int) -> list[str]:
    """Fetching what a certificate's own URLs say (CDP, freshest CRL, caIssuers), by HTTP and
    LDAP, for a subscriber of the CA with two CRL partitions and delta CRLs."""
    if "partitioned" not in m:
        return []
    q = shlex.quote
    cert = q(m["partitioned"]["path"])
    grep = "grep -o 'http://[^ ,]*'"
    return [
        f"# {m['partitioned']['ca']} has two CRL partitions and delta CRLs: the URLs its "
        "certificates print are served as printed",
        f"url=$(openssl x509 -in {cert} -noout -ext crlDistributionPoints | {grep})",
        'echo "$url"; curl -sf "$url" | openssl crl -inform DER -noout -text | '
        "grep -E -A3 'Issuing Distribution|CRL Number'",
        f"url=$(openssl x509 -in {cert} -noout -ext freshestCRL | {grep})",
        'curl -sf "$url" | openssl crl -inform DER -noout -text | grep -A1 \'Delta CRL\'',
        f"url=$(openssl x509 -in {cert} -noout -ext authorityInfoAccess | grep 'CA Issuers' "
        f"| {grep} | head -1)",
        'curl -sf "$url" | openssl x509 -inform DER -noout -subject',
        "# the ldap:// distribution point of the same certificate: its DN, as a base search",
        f"ldapsearch -x -LLL -H ldap://127.0.0.1:{ldap_port} -s base "
        f"-b {q(m['partitioned']['dp_dn'])} 'certificateRevocationList;binary' | head -3",
        "",
    ]


def certpub_command() -> str:
    """How to run ``certpub`` from any shell: the full path of the script beside this Python
    (``.venv/bin/certpub``, which is not on PATH unless the venv is activated)."""
    script = Path(sys.executable).parent / "certpub"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m server.cli"


def busy_ports(ports: dict[str, int], host: str = "127.0.0.1") -> dict[str, str]:
    """{option: why} for each port something already listens on."""
    busy = {}
    for option, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted binds
            try:
                s.bind((host, port))
            except OSError as exc:
                busy[option] = exc.strerror or str(exc)
    return busy


def check_ports(folder: Path, ldap_port: int, http_port: int) -> None:
    """Stop before building anything when a demo port is taken, suggesting free ones."""
    ports = {"--ldap-port": ldap_port, "--http-port": http_port}
    busy = busy_ports(ports)
    if not busy:
        return
    taken = set(ports.values())
    advice = []
    for option, port in ports.items():
        if option not in busy:
            continue
        alternative = next((p for p in range(port + 1000, 65536, 1000)
                            if p not in taken and not busy_ports({option: p})), None)
        if alternative is not None:
            taken.add(alternative)
            advice.append(f"{option} {alternative}")
    problems = "; ".join(f"port {ports[o]} ({o[2:-5].upper()}) on 127.0.0.1: {why}"
                         for o, why in busy.items())
    fresh = "--fresh " if (folder / MANIFEST).exists() else ""
    hint = (f"; try again with {fresh}{' '.join(advice)}" if advice
            else "; choose free ports with --ldap-port and --http-port")
    raise SystemExit(f"certpub: {problems}{hint}")


def _use_token(m: dict[str, Any]) -> None:
    """Point the PKCS#11 library at the demo's SoftHSM2 token (``--hsm``)."""
    conf = m.get("softhsm2_conf")
    if conf:
        os.environ["SOFTHSM2_CONF"] = conf


def prepare(folder: Path, ldap_port: int, http_port: int, fresh: bool,
            hsm: bool = False) -> dict[str, Any]:
    """Build the PKI (unless already there) and import it; returns the manifest. ``hsm``:
    the OCSP signer keys go into a SoftHSM2 token in ``folder/softhsm`` (server.demo.hsm)."""
    from server.config import load_config
    from server.demo.pki import build_demo_pki
    from importer.run import import_openssl, import_paths

    manifest_path = folder / MANIFEST
    if fresh and folder.exists():
        shutil.rmtree(folder)
    if manifest_path.exists():
        m: dict[str, Any] = json.loads(manifest_path.read_text())
        if m.get("ports") != [ldap_port, http_port] or "partitioned" not in m:
            # the URLs printed in its certificates name the ports: build them again
            print(f"certpub: {folder} was built for ports {m.get('ports')} (or by an older"
                  f" certpub); rebuilding it for LDAP {ldap_port}, HTTP {http_port}",
                  file=sys.stderr)
            shutil.rmtree(folder)
            return prepare(folder, ldap_port, http_port, False, hsm)
        if hsm != bool(m.get("softhsm2_conf")):
            raise SystemExit(f"certpub: {folder} was built {'without' if hsm else 'with'} --hsm;"
                             " use --fresh to rebuild")
        _use_token(m)
        # The walk-through starts from the first CRLs: forget what an earlier run imported
        # (the newer CRL it printed how to drop) so that its "# good" is true again.
        print(f"Using the demo PKI in {folder} (--fresh rebuilds it); resetting its store and "
              "spool to the first CRLs", file=sys.stderr)
        config = load_config(Path(m["config"]))
        reset_store(config)
    else:
        print(f"Building a demo PKI in {folder} ...", file=sys.stderr)
        pki = build_demo_pki(folder, ldap_port=ldap_port, http_port=http_port)
        m = _pick(pki)
        m["ports"] = [ldap_port, http_port]
        m["crls"] = [str(p) for ca in pki.cas.values() if ca.crl_path is not None
                     for p in (ca.crl_path, *ca.scope_crl_paths)]
        if hsm:
            from server.demo.hsm import SoftHsmMissing, create_token, move_signer_keys

            try:
                token = create_token(folder / "softhsm", label="certpub-demo")
            except SoftHsmMissing as exc:
                raise SystemExit(f"certpub: --hsm: {exc}") from None
            moved = move_signer_keys(pki.config_path, token)
            m["softhsm2_conf"] = str(token.conf)
            _use_token(m)
            print(f"OCSP signer keys moved into the SoftHSM2 token {token.label!r} "
                  f"({', '.join(sorted(moved.values()))}); SOFTHSM2_CONF={token.conf}",
                  file=sys.stderr)
        config = load_config(pki.config_path)
    summary = import_openssl(config, now=_now, progress=sys.stderr)
    print(summary.line(), file=sys.stderr)
    summary = import_paths(config, [Path(p) for p in m["crls"]], now=_now, progress=sys.stderr)
    print(summary.line(), file=sys.stderr)
    manifest_path.write_text(json.dumps(m, indent=2, ensure_ascii=False))
    return m


def reset_store(config: Any) -> None:
    """Delete the demo's store and empty its spool (pending, done and rejected files)."""
    for stale in config.store.path.parent.glob(config.store.path.name + "*"):
        stale.unlink()
    for spool in config.import_.spool:
        if spool.is_dir():
            for entry in spool.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def run_demo(folder: Path, *, ldap_port: int, http_port: int, serve: bool, fresh: bool,
             hsm: bool = False) -> int:
    """The whole demo; serving runs until Ctrl-C."""
    from server.config import load_config

    folder = folder.resolve()
    if serve:
        check_ports(folder, ldap_port, http_port)
    m = prepare(folder, ldap_port, http_port, fresh, hsm)
    config = load_config(Path(m["config"]))
    from server.status import print_status

    print_status(config, _now())
    print()
    print(commands(m, ldap_port, http_port))
    if m.get("softhsm2_conf"):
        print(f"\n# the OCSP keys are in a SoftHSM2 token: serve this configuration yourself with\n"
              f"SOFTHSM2_CONF={shlex.quote(m['softhsm2_conf'])} {certpub_command()} check-config --config "
              f"{shlex.quote(m['config'])}")
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

    print(f"Serving LDAP on 127.0.0.1:{ldap_port} and HTTP on 127.0.0.1:{http_port} "
          f"(search page http://127.0.0.1:{http_port}/); "
          f"import daemon watching {m['spool']}. Ctrl-C stops.", flush=True)
    daemon.start()
    try:
        return serve_forever(config, Path(m["config"]))
    finally:
        stop.set()
        daemon.join(timeout=10)

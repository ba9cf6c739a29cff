"""The issue-23 speed scenario of ``bench/ocsp_bench.py --crl-urls WORK``: CRLs and CA
certificates answered at the URLs the certificates print, against certpub's cached OCSP GET
of the same run and against nginx serving the same bytes from a file.

Setup (in WORK, once; reused when there): the demo PKI built for a free HTTP port (its
ec-ca prints partition, delta and caIssuers URLs on 127.0.0.1:PORT), imported, plus one more
partition of ec-ca — ``big.crl``, an IDP-scoped CRL of ``--big-entries`` revoked serials
(~10 MB at 280,000) — built with asn1crypto and signed with the CA's key. Targets: ``certpub
serve`` (one worker, HTTP only, logging one line per request to a file) and nginx (one
worker, ``sendfile on`` as nginx is deployed for static files, ``open_file_cache``). Scenarios, each one ``wrk -t1 -cC -dD`` run, rounds
alternating the targets:

- ``ocsp-get``: certpub, the cached OCSP GET of a demo certificate (the reference rate);
- ``ca``: GET of the caIssuers URL (the CA certificate, DER);
- ``crl-small``: GET of partition 0's URL (a CRL of a few hundred bytes);
- ``crl-big``: GET of big.crl's URL (bytes per second is the figure).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asn1crypto import crl as acrl
from asn1crypto import x509 as ax
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

LUA_URL = """
wrk.path = os.getenv("CRL_PATH")
"""


def big_crl(ca_pem: Path, key_pem: Path, url: str, entries: int, now: datetime) -> bytes:
    """An IDP-scoped CRL (RFC 5280 §5.2.5) of ``entries`` made-up serials, DER."""
    cert = ax.Certificate.load(_pem_der(ca_pem))
    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ski = cert.key_identifier
    tbs = acrl.TbsCertList({
        "version": "v2", "signature": {"algorithm": "sha384_ecdsa"},
        "issuer": cert.subject,
        "this_update": ax.Time({"utc_time": now - timedelta(hours=1)}),
        "next_update": ax.Time({"utc_time": now + timedelta(days=7)}),
        "crl_extensions": [
            {"extn_id": "crl_number", "critical": False, "extn_value": 1},
            {"extn_id": "authority_key_identifier", "critical": False,
             "extn_value": {"key_identifier": ski}},
            {"extn_id": "issuing_distribution_point", "critical": True,
             "extn_value": {"distribution_point": ax.DistributionPointName(
                 name="full_name", value=[ax.GeneralName(
                     name="uniform_resource_identifier", value=url)]),
                 "only_contains_user_certs": True}},
        ],
    })
    # the entries by hand (asn1crypto takes minutes for 280,000 of them): a SEQUENCE of
    # (16-octet serial, UTCTime) put before the [0] crlExtensions
    when = (now - timedelta(days=1)).strftime("%y%m%d%H%M%SZ").encode()
    entry = b"\x30\x21\x02\x10%s\x17\x0d" + when
    revoked = _tlv(0x30, b"".join(entry % ((1 << 120) + i).to_bytes(16, "big")
                                  for i in range(entries)))
    head = tbs.dump()
    body = head[_header_length(head):]
    ext = 0  # the offset of the last element (the [0] crlExtensions)
    while True:
        size = _header_length(body[ext:]) + _content_length(body[ext:])
        if ext + size >= len(body):
            break
        ext += size
    assert body[ext] == 0xA0
    tbs_der = _tlv(0x30, body[:ext] + revoked + body[ext:])
    tbs = acrl.TbsCertList.load(tbs_der)
    signature = key.sign(tbs_der, ec.ECDSA(hashes.SHA384()))
    return acrl.CertificateList({"tbs_cert_list": tbs,
                                 "signature_algorithm": {"algorithm": "sha384_ecdsa"},
                                 "signature": signature}).dump()


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _header_length(der: bytes) -> int:
    return 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)


def _content_length(der: bytes) -> int:
    if der[1] < 0x80:
        return der[1]
    n = der[1] & 0x7F
    return int.from_bytes(der[2:2 + n], "big")


def _pem_der(path: Path) -> bytes:
    from asn1crypto import pem

    data = path.read_bytes()
    return pem.unarmor(data)[2] if pem.detect(data) else data


def prepare(work: Path, port: int, entries: int) -> dict[str, Any]:
    """The demo PKI for ``port`` with big.crl, imported; the URLs and bytes to fetch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cryptography import x509

    from importer.run import import_openssl, import_paths
    from server.config import load_config
    from server.demo.pki import build_demo_pki

    now = datetime.now(UTC).replace(microsecond=0)
    pki = build_demo_pki(work / "demo", now=now, http_port=port, overwrite=True)
    ca = pki.cas["ec-ca"]
    base = f"http://127.0.0.1:{port}"
    big_path = work / "big.crl"
    started = time.monotonic()
    big = big_crl(ca.cert_path, ca.key_path, f"{base}/repository/ec-ca/big.crl", entries, now)
    big_path.write_bytes(big)
    print(f"big.crl: {len(big):,} bytes, {entries:,} entries, built in "
          f"{time.monotonic() - started:.1f} s", flush=True)
    config = load_config(pki.config_path)
    import_openssl(config, now=lambda: datetime.now(UTC), progress=None)
    files = [p for c in pki.cas.values() if c.crl_path is not None
             for p in (c.crl_path, *c.scope_crl_paths)] + [big_path]
    started = time.monotonic()
    summary = import_paths(config, files, now=lambda: datetime.now(UTC), progress=None)
    print(f"import: {summary.line()} in {time.monotonic() - started:.1f} s", flush=True)
    part0 = x509.load_pem_x509_crl(ca.scope_crl_paths[0].read_bytes())
    good = next(c for c in pki.certs if c.ca == "ec-ca" and c.state == "good")
    return {
        "config": pki.config_path, "pki": pki, "good": good,
        "paths": {"ca": "/repository/ec-ca.crt", "crl-small": "/repository/ec-ca/part0.crl",
                  "crl-big": "/repository/ec-ca/big.crl"},
        "bodies": {"ca": x509.load_pem_x509_certificate(ca.cert_path.read_bytes()).public_bytes(
            serialization.Encoding.DER), "crl-small": part0.public_bytes(
                serialization.Encoding.DER), "crl-big": big},
    }


def ocsp_get_path(setup: dict[str, Any]) -> str:
    """The percent-encoded base64 GET path of an OCSP request for a good demo certificate."""
    import base64
    import urllib.parse

    from cryptography import x509
    from cryptography.x509 import ocsp

    pki = setup["pki"]
    cert = setup["good"].load()
    issuer = x509.load_pem_x509_certificate(pki.cas["ec-ca"].cert_path.read_bytes())
    der = (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
           .public_bytes(serialization.Encoding.DER))
    return "/ocsp/" + urllib.parse.quote(base64.b64encode(der).decode(), safe="")


def nginx_site(work: Path, bodies: dict[str, bytes], paths: dict[str, str]) -> Path:
    """The files nginx serves: the same bytes at the same paths."""
    root = work / "www"
    for name, path in paths.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bodies[name])
    return root


def run_url(port: int, path: str, lua: Path, args: Any, cpu_of: Any, pid: int
            ) -> dict[str, float]:
    env = dict(os.environ, CRL_PATH=path)
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "-s", str(lua), f"http://127.0.0.1:{port}/"]
    cpu0, t0 = cpu_of(pid), time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_bytes = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    server_cpu = cpu_of(pid) - cpu0
    out = out_bytes.decode()
    if status != 0 or "Requests/sec" not in out:
        raise SystemExit(f"wrk failed on {path}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    if bad:
        raise SystemExit(f"{bad.group(1)} non-2xx answers on {path}:\n{out}")
    return {"rps": rps, "wrk_cpu": (usage.ru_utime + usage.ru_stime) / wall,
            "server_cpu": server_cpu / wall}


def main(args: Any, helpers: Any) -> None:
    """``ocsp_bench.py --crl-urls WORK``: see the module docstring."""
    work = args.crl_urls.resolve()
    work.mkdir(parents=True, exist_ok=True)
    port = helpers.free_port()
    setup = prepare(work, port, args.big_entries)
    lua = work / "url.lua"
    lua.write_text(LUA_URL)
    config = work / "certpub.toml"
    text = Path(setup["config"]).read_text()
    text = re.sub(r"(?ms)^\[ldap\]\nlisten = \[.*?\]\n", "[ldap]\nlisten = []\n", text)
    text = text.replace('[log]\nformat = "logfmt"\n',
                        f'[log]\nformat = "logfmt"\nfile = "{work}/certpub.log"\n')
    config.write_text(text + "\n[server]\nworkers = 1\n")
    exe = Path(sys.executable).with_name("certpub")
    certpub = subprocess.Popen([str(exe), "serve", "--config", str(config)],
                               stdout=open(work / "certpub.out", "wb"),  # noqa: SIM115
                               stderr=subprocess.STDOUT)
    nginx_port = helpers.free_port()
    conf = helpers.nginx_conf(work, nginx_port, nginx_site(work, setup["bodies"], setup["paths"]),
                              sendfile=True, default_type="application/pkix-crl")
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    runs: list[dict[str, Any]] = []
    try:
        helpers.wait_port(port, certpub)
        helpers.wait_port(nginx_port, nginx)
        paths = dict(setup["paths"], **{"ocsp-get": ocsp_get_path(setup)})
        for name, path in paths.items():  # every answer is right before anything is timed
            for p, who in ((port, "certpub"), (nginx_port, "nginx")):
                if who == "nginx" and name == "ocsp-get":
                    continue
                code, body = helpers.http_exchange(
                    p, f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                assert code == 200, (who, name, code)
                if name != "ocsp-get":
                    assert body == setup["bodies"][name], (who, name, len(body))
        targets = [("certpub", port, certpub.pid), ("nginx", nginx_port, nginx.pid)]
        for r in range(args.rounds):
            for who, p, pid in targets[r % 2:] + targets[:r % 2]:
                for name, path in paths.items():
                    if who == "nginx" and name == "ocsp-get":
                        continue
                    res = run_url(p, path, lua, args, helpers.tree_cpu, pid)
                    size = len(setup["bodies"].get(name, b""))
                    res["bytes_s"] = res["rps"] * size
                    runs.append({"round": r, "target": who, "scenario": name, **res})
                    print(f"round {r} {who:8} {name:9} {res['rps']:9.0f} req/s"
                          f" {res['bytes_s'] / 1e6:9.1f} MB/s  wrk cpu {res['wrk_cpu']:.2f}"
                          f"  server cpu {res['server_cpu']:.2f}", flush=True)
    finally:
        for proc in (certpub, nginx):
            helpers.stop_process(proc)

    def med(who: str, name: str, key: str = "rps") -> float:
        vals = [x[key] for x in runs if x["target"] == who and x["scenario"] == name]
        return statistics.median(vals) if vals else float("nan")

    ocsp = med("certpub", "ocsp-get")
    print(f"\nmachine: {helpers.machine()}; wrk -t1 -c{args.connections} -d{args.duration}s,"
          f" {args.rounds} rounds, medians; big.crl {len(setup['bodies']['crl-big']):,} bytes\n")
    print("| scenario | bytes | certpub req/s | certpub MB/s | × certpub OCSP GET |"
          " nginx req/s | nginx MB/s | × nginx |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("ocsp-get", "ca", "crl-small", "crl-big"):
        c, n = med("certpub", name), med("nginx", name)
        size = len(setup["bodies"].get(name, b""))
        print(f"| {name} | {size:,} | {c:,.0f} | {c * size / 1e6:,.1f} | {c / ocsp:.2f} |"
              f" {n:,.0f} | {n * size / 1e6:,.1f} | {c / n:.2f} |")

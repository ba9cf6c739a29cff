"""HSM benchmark (issue 15): OCSP signing through SoftHSM2 (PKCS#11) against a key file.

Usage: python bench/hsm_bench.py DATA [--keys p256,rsa2048] [--seconds 3] [--rounds 3]
                                      [--duration 5] [--connections 4] [--threads 0]
                                      [--workers 1] [--serial 0x1000] [--work DIR]

DATA is a directory written by ``bench/gen_certs.py`` and imported (as for ocsp_bench.py; copy
the shared one first). The script makes a SoftHSM2 token of its own in WORK/hsm and, per key
type, one OCSP signer key (P-256: DATA/ocsp.key; RSA-2048: a new key certified with
DATA/ca.key), kept both as a file and imported into the token — the same key either way.

1. Bare signing rate, in this process, one thread (one core): ``cryptography`` with the key
   file; python-pkcs11 calling the token directly (C_Sign on one session); and certpub's
   ``TokenKey.sign`` (what the server calls: session pool, digest, r||s -> DER).
2. ``certpub serve`` twice per key type, once with ``signer_key`` = the file and once = the
   token URI, driven by ``wrk -t1 -cC -dD`` with a cached request (POST, no nonce: served from
   the pre-signed cache) and with a fresh 32-octet nonce per request (signed per request).
   Rounds alternate the order of file and token; figures are medians.

Targets (issue 15): cached answers with the token key >= 0.95x the file key's; nonce answers
with the token key >= 0.8x the token's bare signing rate (certpub's TokenKey.sign).
Nothing is left running: every server is stopped, also on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ocsp_bench import LUA_NONCE, LUA_POST, LUA_RESOLVE  # noqa: E402 - the same wrk scripts
from slapd_env import free_port, stop_process  # noqa: E402 - the bench scripts' shared helpers

from server.demo.hsm import SoftHsmToken, create_token  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")



# --- keys ---------------------------------------------------------------------------------------


def signer_files(data: Path, work: Path, kind: str) -> tuple[Path, Path, Any]:
    """(key file, certificate file, key) of an OCSP signer of DATA's CA."""
    if kind == "p256":
        key = serialization.load_pem_private_key((data / "ocsp.key").read_bytes(), None)
        return data / "ocsp.key", data / "ocsp.pem", key
    if kind != "rsa2048":
        raise SystemExit(f"unknown key type {kind} (p256, rsa2048)")
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    ca_key: Any = serialization.load_pem_private_key((data / "ca.key").read_bytes(), None)
    key = rsa.generate_private_key(65537, 2048)
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string(
        "CN=Bench RSA OCSP Signer,O=Bench,C=MO")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = work / "rsa2048.key", work / "rsa2048.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, key


def config_text(data: Path, work: Path, name: str, port: int, cert: Path, signer_key: str,
                token: SoftHsmToken, threads: int, workers: int) -> Path:
    text = (data / "certpub.toml").read_text()
    text = re.sub(r'(?m)^signer_certificate = ".*"$', f'signer_certificate = "{cert}"', text)
    text = re.sub(r'(?m)^signer_key = ".*"$', f'signer_key = "{signer_key}"', text)
    text = re.sub(r"(?ms)^\[ldap\]\nlisten = \[.*?\]\n", "[ldap]\nlisten = []\n", text)
    text = re.sub(r"(?ms)^\[http\]\nlisten = \[.*?\]\n",
                  f'[http]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n', text)
    text = text.replace("[store]\n", f"[store]\nthreads = {threads}\n", 1)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    text += (f'\n[log]\nfile = "{folder}/certpub.log"\n\n[server]\nworkers = {workers}\n'
             f'\n[pkcs11]\nmodule = "{token.module}"\npin_file = "{token.pin_file}"\n')
    path = folder / "certpub.toml"
    path.write_text(text)
    return path


# --- bare signing -------------------------------------------------------------------------------


def rate(fn: Any, seconds: float) -> tuple[float, float]:
    """(operations per second, CPU seconds per wall second of this process) for fn()."""
    fn()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for _ in range(20):
            fn()
        n += 20
        wall = time.perf_counter() - t0
        if wall >= seconds:
            return n / wall, (time.process_time() - c0) / wall


def bare_rates(kind: str, key: Any, uri: str, cert: Path, token: SoftHsmToken,
               seconds: float) -> dict[str, tuple[float, float]]:
    import pkcs11

    from server.ocsp.config import Pkcs11Config
    from server.ocsp.hsm import open_token_key
    from server.ocsp.p11uri import parse_pkcs11_uri

    data = os.urandom(280)  # about the size of a one-certificate tbsResponseData
    out: dict[str, tuple[float, float]] = {}
    if kind == "p256":
        out["cryptography"] = rate(lambda: key.sign(data, ec.ECDSA(hashes.SHA256())), seconds)
    else:
        out["cryptography"] = rate(lambda: key.sign(data, padding.PKCS1v15(), hashes.SHA256()),
                                   seconds)
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    cfg = Pkcs11Config(module=token.module, pin_file=token.pin_file, pin_env=None)
    tk = open_token_key(cfg, parse_pkcs11_uri(uri, "bench"), certificate.public_key(),
                        ca_name="bench", rsa_padding="pkcs1v15", key="bench",
                        cert_path=str(cert))
    plan = tk.plan
    assert plan is not None
    lib = pkcs11.lib(str(token.module))
    session = lib.get_token(token_label=token.label).open()  # logged in already (tk)
    raw_key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY,
                              label=uri.rsplit("object=", 1)[1])
    out["python-pkcs11 C_Sign"] = rate(
        lambda: raw_key.sign(plan.payload(data), mechanism=plan.mechanism,
                             mechanism_param=plan.param), seconds)
    out["certpub TokenKey.sign"] = rate(lambda: tk.sign(data), seconds)
    session.close()
    tk.close()
    return out


# --- servers and wrk ----------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return total / CLK


def post(port: int, body: bytes) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/ocsp-request"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return resp.read()
    finally:
        conn.close()


class Server:
    def __init__(self, name: str, config: Path, port: int, env: dict[str, str]) -> None:
        self.name, self.port = name, port
        exe = Path(sys.executable).with_name("certpub")
        log = open(config.parent / "certpub.out", "wb")  # noqa: SIM115 - lives with the server
        self.proc = subprocess.Popen([str(exe), "serve", "--config", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name}: certpub exited with {self.proc.returncode}; see"
                                 f" {config.parent / 'certpub.out'}")
            try:
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: nothing listens on {port}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)  # type: ignore[arg-type]


def check(der: bytes, nonce: bytes | None, signer_cert: Path) -> None:
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, resp.response_status
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    if nonce is not None:
        assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    public: Any = x509.load_pem_x509_certificate(signer_cert.read_bytes()).public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(),
                      hashes.SHA256())
    else:
        public.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


def run_wrk(server: Server, scenario: str, files: dict[str, Path],
            args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, OCSP_BODY=str(files["plain" if scenario == "cached" else "prefix"]))
    script = files["post.lua" if scenario == "cached" else "nonce.lua"]
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "-s", str(script),
           f"http://127.0.0.1:{server.port}/"]
    cpu0, t0 = tree_cpu(server.proc.pid), time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                         check=False).stdout
    wall = time.monotonic() - t0
    cpu = tree_cpu(server.proc.pid) - cpu0
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m is None:
        raise SystemExit(f"wrk failed against {server.name} {scenario}:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    rps = float(m.group(1))
    return {"rps": rps, "non2xx": int(bad.group(1)) if bad else 0, "server_cpu": cpu / wall,
            "us_per_req": 1e6 * cpu / max(rps * wall, 1)}


def requests(data: Path, serial: int) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((data / "certs" / f"{serial:X}.pem").read_bytes())
    plain = (ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build()
             .public_bytes(serialization.Encoding.DER))
    nonce = (ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1())
             .add_extension(x509.OCSPNonce(b"\x00" * 32), critical=False).build()
             .public_bytes(serialization.Encoding.DER))
    assert nonce.endswith(b"\x00" * 32)
    return plain, nonce[:-32]


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--keys", default="p256,rsa2048")
    parser.add_argument("--seconds", type=float, default=3.0, help="per bare signing rate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (max 5)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="[store] threads of certpub")
    parser.add_argument("--workers", type=int, default=1, help="certpub worker processes")
    parser.add_argument("--serial", type=lambda s: int(s, 0), default=0x1000)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    args.duration = min(args.duration, 5)
    data = args.data.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="hsm-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    token = create_token(work / "hsm", label="bench")
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    env = token.env()

    plain, prefix = requests(data, args.serial)
    files = {"plain": work / "req.der", "prefix": work / "req-nonce-prefix.der",
             "post.lua": work / "post.lua", "nonce.lua": work / "nonce.lua"}
    files["plain"].write_bytes(plain)
    files["prefix"].write_bytes(prefix)
    files["post.lua"].write_text(LUA_POST + LUA_RESOLVE)
    files["nonce.lua"].write_text(LUA_NONCE + LUA_RESOLVE)

    table: list[str] = []
    for n, kind in enumerate(args.keys.split(","), start=1):
        key_path, cert_path, key = signer_files(data, work, kind)
        uri = token.import_key(key_path, f"bench-{kind}", bytes([n]))
        bare = bare_rates(kind, key, uri, cert_path, token, args.seconds)
        for what, (ops, cpu) in bare.items():
            print(f"{kind:8} bare {what:24} {ops:9.0f} signatures/s  (cpu {cpu:.2f})", flush=True)
        servers: list[Server] = []
        runs: list[dict[str, Any]] = []
        try:
            for name, signer_key in (("file", str(key_path)), ("token", uri)):
                port = free_port()
                conf = config_text(data, work, f"{kind}-{name}", port, cert_path, signer_key,
                                   token, args.threads, args.workers)
                servers.append(Server(f"{kind}-{name}", conf, port, env))
            for s in servers:  # both answer correctly, signed by the expected key
                check(post(s.port, plain), None, cert_path)
                nonce = os.urandom(32)
                check(post(s.port, prefix + nonce), nonce, cert_path)
            for r in range(args.rounds):
                order = servers if r % 2 == 0 else servers[::-1]
                for s in order:
                    for scenario in ("cached", "nonce"):
                        res = run_wrk(s, scenario, files, args)
                        runs.append({"server": s.name, "scenario": scenario, **res})
                        print(f"round {r} {s.name:14} {scenario:6} {res['rps']:9.0f} req/s"
                              f"  server cpu {res['server_cpu']:.2f}"
                              f" ({res['us_per_req']:.0f} µs/req)  non2xx {res['non2xx']}",
                              flush=True)
        finally:
            for s in servers:
                s.stop()

        def med(server: str, scenario: str, field: str = "rps") -> float:
            return statistics.median(x[field] for x in runs
                                     if x["server"] == server and x["scenario"] == scenario)

        token_bare = bare["certpub TokenKey.sign"][0]
        cf, ct = med(f"{kind}-file", "cached"), med(f"{kind}-token", "cached")
        nf, nt = med(f"{kind}-file", "nonce"), med(f"{kind}-token", "nonce")
        table += [
            f"| {kind} | bare signing, one core | cryptography {bare['cryptography'][0]:,.0f}/s |"
            f" SoftHSM2 C_Sign {bare['python-pkcs11 C_Sign'][0]:,.0f}/s, TokenKey.sign"
            f" {token_bare:,.0f}/s | {token_bare / bare['cryptography'][0]:.2f}x |",
            f"| {kind} | cached answers (req/s) | file key {cf:,.0f} | token key {ct:,.0f}"
            f" | {ct / cf:.2f}x (target >= 0.95) |",
            f"| {kind} | nonce answers (req/s) | file key {nf:,.0f} | token key {nt:,.0f}"
            f" ({med(f'{kind}-token', 'nonce', 'us_per_req'):.0f} µs CPU/req) |"
            f" {nt / token_bare:.2f}x the token's bare rate (target >= 0.8) |",
        ]
    load = os.getloadavg()
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds (medians),"
          f" certpub --workers {args.workers}, [store] threads = {args.threads};"
          f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    print("| key | what | file / in-process | token | ratio |\n|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""OCSP benchmark (issue 7, item 3): certpub vs `openssl ocsp` vs nginx serving a pre-signed file.

Usage: python bench/ocsp_bench.py DATA [--rounds 3] [--duration 5] [--connections 4]
                                       [--workers 1] [--serial 0x1000] [--work DIR]
       python bench/ocsp_bench.py --crl-urls WORK [--rounds 3] [--duration 5] [--connections 4]
           (issue 23: CRLs / CA certificates at the certificates' own URLs; bench/crl_urls.py)

DATA is a directory written by ``bench/gen_certs.py`` and already imported
(``certpub import --config DATA/certpub.toml --openssl`` then ``... DATA/crl.pem``).

Three targets on 127.0.0.1, each on a free port chosen at run time:
- certpub: ``certpub serve`` with a copy of DATA/certpub.toml (HTTP only, ``[server] workers``
  set to --workers, logging one line per request to a file, as in production);
- nginx: one worker serving the certpub response of the same request as a static file
  (``sendfile off``, ``open_file_cache``, keep-alive, ``access_log off``) — the HTTP ceiling;
  POST is answered from the same file through ``error_page 405 =200``;
- ``openssl ocsp -index DATA/index.txt -rsigner ocsp.pem -rkey ocsp.key -CA ca.pem``: it signs
  every answer and handles one request per connection (HTTP/1.0, then close), so it is driven
  with its natural client pattern: ``Connection: close``, a new TCP connection per request.
  (``openssl ocsp -port`` cannot bind one address: it listens on every interface while the
  benchmark runs.)

Scenarios: ``get`` (GET <path>/<percent-encoded base64>), ``post`` (POST of the same DER) —
both cached by certpub — and ``nonce`` (POST with a fresh random 32-octet nonce per request:
signed per request by certpub and openssl; nginx cannot do it). Each measurement is one
``wrk --latency -t1 -cC -dD`` run with a Lua script; rounds alternate certpub/nginx/openssl
(rotating the order each round); the figures are medians over the rounds, p99 from wrk's
latency distribution. The load generator's CPU (wrk user+sys from wait4) and each server's
CPU (/proc/PID/stat, its whole process tree) are reported per run: the machine's cores are
shared by the servers and the load generator.

``--targets`` picks among certpub, floor (``bench/ocsp_floor.py``), floor-direct (the same with
the answer sent at once while nothing is buffered, as certpub's listener does), nginx and
openssl (default: all but floor-direct).

``--certpub-config NAME=CONFIG`` (repeatable) adds a certpub target started from CONFIG instead
of DATA/certpub.toml (e.g. ``bench/pg_env.py``'s PostgreSQL variant), in the same rotation;
``--certpub-root NAME=DIR`` (repeatable) adds a certpub target run from another checkout DIR
(its ``.venv/bin/certpub``, so its own code) with the same DATA/certpub.toml, in the same
rotation: an A/B of two versions of the code measured paired and alternating (e.g.
``--certpub-root main=/work/main``). ``--db-pid NAME=PID`` adds PID's process tree (that PostgreSQL server) to NAME's server CPU and
CPU per request, also reported alone ("of it db").
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from slapd_env import free_port, stop_process  # the bench scripts' shared helpers

HERE = Path(__file__).resolve().parent
CLK = os.sysconf("SC_CLK_TCK")
PAGE_CTYPE = "application/ocsp-request"


# --- helpers ------------------------------------------------------------------------------


def listening(port: int) -> bool:
    """Whether something listens on port (from /proc/net: a probe connection would be taken
    as a request by `openssl ocsp`, which then hangs on it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before listening on {port}")
        if listening(port):
            return
        time.sleep(0.1)
    for pid in reversed(tree_pids(proc.pid)):  # leave nothing running behind the error
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


# target name -> pid of a database server it uses (its process tree's CPU counts as the target's)
DB_PIDS: dict[str, int] = {}


def tree_cpu(pid: int) -> float:
    """user+sys seconds of pid and its descendants (alive ones)."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK


def http_exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    code, _, body = http_raw(port, raw)
    return code, body


def http_raw(port: int, raw: bytes) -> tuple[int, bytes, bytes]:
    """(status, the whole response as sent, its body) of one request on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), data, body


# --- requests -----------------------------------------------------------------------------


def make_requests(data: Path, serial: int) -> dict[str, bytes]:
    ca = x509.load_pem_x509_certificate((data / "ca.pem").read_bytes())
    cert_path = data / "certs" / f"{serial:X}.pem"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    plain = (ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build()
             .public_bytes(serialization.Encoding.DER))
    with_nonce = (ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1())
                  .add_extension(x509.OCSPNonce(b"\x00" * 32), critical=False).build()
                  .public_bytes(serialization.Encoding.DER))
    assert with_nonce.endswith(b"\x00" * 32)  # the nonce octets end the DER: the Lua
    return {"plain": plain, "nonce_prefix": with_nonce[:-32]}  # script appends fresh ones


def check_response(der: bytes, nonce: bytes | None = None) -> None:
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, resp.response_status
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD, resp.certificate_status
    if nonce is not None:
        got = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        assert got == nonce, "nonce not echoed"


# wrk's default resolve() opens and closes a probe connection: `openssl ocsp` (3.0) then spins
# reading EOF on it forever, so every script resolves without probing.
LUA_RESOLVE = """
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup(host, service)
end
"""

LUA_POST = """
wrk.method = "POST"
local f = assert(io.open(os.getenv("OCSP_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/ocsp-request"
if os.getenv("OCSP_CLOSE") == "1" then wrk.headers["Connection"] = "close" end
"""

LUA_GET = """
wrk.method = "GET"
wrk.path = os.getenv("OCSP_PATH")
if os.getenv("OCSP_CLOSE") == "1" then wrk.headers["Connection"] = "close" end
"""

LUA_NONCE = """
local f = assert(io.open(os.getenv("OCSP_BODY"), "rb"))
local prefix = f:read("*a")
f:close()
local headers = {["Content-Type"] = "application/ocsp-request"}
if os.getenv("OCSP_CLOSE") == "1" then headers["Connection"] = "close" end
math.randomseed(os.time())
local char, random, concat = string.char, math.random, table.concat
request = function()
  local t = {}
  for i = 1, 32 do t[i] = char(random(0, 255)) end
  return wrk.format("POST", "/", headers, prefix .. concat(t))
end
"""


# --- targets ------------------------------------------------------------------------------


class Target:
    name = ""
    proc: subprocess.Popen[bytes]
    port: int
    close_each = False  # one request per connection

    def stop(self) -> None:
        stop_process(self.proc)


class Certpub(Target):
    name = "certpub"

    def __init__(self, data: Path, work: Path, workers: int, *, name: str = "certpub",
                 config: Path | None = None, root: Path | None = None) -> None:
        self.name = name
        self.port = free_port()
        text = (config or data / "certpub.toml").read_text()
        work = work / name
        work.mkdir(parents=True, exist_ok=True)
        text = re.sub(r"(?ms)^\[ldap\]\nlisten = \[.*?\]\n", "[ldap]\nlisten = []\n", text)
        text = re.sub(r"(?ms)^\[http\]\nlisten = \[.*?\]\n",
                      f'[http]\nlisten = ["tcp:{self.port}:interface=127.0.0.1"]\n', text)
        text += f'\n[log]\nfile = "{work}/certpub.log"\n\n[server]\nworkers = {workers}\n'
        self.config = work / "certpub.toml"
        self.config.write_text(text)
        exe = (root / ".venv" / "bin" / "certpub" if root is not None
               else Path(sys.executable).with_name("certpub"))
        self.proc = subprocess.Popen([str(exe), "serve", "--config", str(self.config)],
                                     cwd=root,
                                     stdout=open(work / "certpub.out", "wb"),  # noqa: SIM115 - lives with the server
                                     stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)


class Nginx(Target):
    name = "nginx"

    def __init__(self, work: Path, response: bytes) -> None:
        self.port = free_port()
        root = work / "www"
        root.mkdir(exist_ok=True)
        (root / "resp.der").write_bytes(response)
        conf = nginx_conf(work, self.port, root, sendfile=False,
                          default_type="application/ocsp-response", location="""
        location / {
            rewrite ^ /resp.der break;
            error_page 405 =200 /resp.der;
        }""")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)


def nginx_conf(work: Path, port: int, root: Path, *, sendfile: bool, default_type: str,
               location: str = "") -> Path:
    """nginx.conf for one worker serving root on 127.0.0.1:port: keep-alive, no access log,
    ``open_file_cache``; ``sendfile`` off for small answers (faster), on for large files."""
    for d in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "nginx-tmp" / d).mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    t = work / "nginx-tmp"
    # As root, nginx's worker would run as nobody and could not read the 0700 work folder.
    user = pwd.getpwuid(os.getuid()).pw_name
    conf.write_text(f"""
user {user};
worker_processes 1;
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile {"on" if sendfile else "off"};
    tcp_nodelay on;
    open_file_cache max=16 inactive=60s;
    open_file_cache_valid 60s;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    client_body_temp_path {t}/client;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    types {{ }}
    default_type {default_type};
    server {{
        listen 127.0.0.1:{port};
        root {root};{location}
    }}
}}
""")
    return conf


class Floor(Target):
    """bench/ocsp_floor.py: fixed response bytes from a bare Twisted Protocol (same Python)."""

    name = "floor"

    def __init__(self, work: Path, get: bytes, post: bytes, *, direct: bool = False) -> None:
        self.port = free_port()
        if direct:  # answers sent at once while nothing is buffered, as certpub does
            self.name = "floor-direct"
        (work / "floor-get.http").write_bytes(get)
        (work / "floor-post.http").write_bytes(post)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ocsp_floor.py"), str(self.port),
             str(work / "floor-get.http"), str(work / "floor-post.http"),
             *(["--direct"] if direct else [])],
            stdout=open(work / "floor.out", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        wait_port(self.port, self.proc)


class OpensslOcsp(Target):
    """Started for each of its runs and stopped right after: a connection wrk closes without
    a request at the end of a run leaves `openssl ocsp` (3.0) spinning on EOF, answering
    nothing more and taking a core from whatever runs next (until 2026-12-02 it was only
    restarted before its own next run, so it spun through the next target's run: figures
    measured before then are low for the target after it in the rotation)."""

    name = "openssl"
    close_each = True

    def __init__(self, data: Path, work: Path) -> None:
        self.data, self.work = data, work
        self.start()

    def restart(self) -> None:
        self.stop()
        self.start()

    def start(self) -> None:
        data, work = self.data, self.work
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["openssl", "ocsp", "-index", str(data / "index.txt"), "-port",
             str(self.port), "-rsigner", str(data / "ocsp.pem"), "-rkey",
             str(data / "ocsp.key"), "-CA", str(data / "ca.pem"), "-nmin", "60", "-ignore_err"],
            stdout=open(work / "openssl.out", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)


# --- wrk ----------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def run_wrk(target: Target, scenario: str, files: dict[str, Path], args: argparse.Namespace
            ) -> dict[str, float]:
    env = dict(os.environ, OCSP_BODY=str(files["plain"]), OCSP_PATH=str(files["get_path"]),
               OCSP_CLOSE="1" if target.close_each else "0")
    script = {"get": files["get.lua"], "post": files["post.lua"], "nonce": files["nonce.lua"]}
    if scenario == "nonce":
        env["OCSP_BODY"] = str(files["nonce_prefix"])
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
           "-s", str(script[scenario]), f"http://127.0.0.1:{target.port}/"]
    if isinstance(target, OpensslOcsp):
        target.restart()
        cmd[-1] = f"http://127.0.0.1:{target.port}/"
    db = DB_PIDS.get(target.name)
    db0 = tree_cpu(db) if db else 0.0
    cpu0, t0 = tree_cpu(target.proc.pid), time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_bytes = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    server_cpu = tree_cpu(target.proc.pid) - cpu0
    db_cpu = (tree_cpu(db) - db0) if db else 0.0
    if isinstance(target, OpensslOcsp):
        target.stop()  # else it spins on wrk's last connection through the next target's run
    out = out_bytes.decode()
    if status != 0 or "Requests/sec" not in out:
        raise SystemExit(f"wrk failed against {target.name} {scenario}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"^\s*50%\s+(\S+)", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "non2xx": int(bad.group(1)) if bad else 0,
            "sock_errors": sum(int(x) for x in errs.groups()) if errs else 0,
            "wrk_cpu": (usage.ru_utime + usage.ru_stime) / wall,
            "server_cpu": (server_cpu + db_cpu) / wall,  # with its database server's
            "db_cpu": db_cpu / wall,
            "server_us_per_req": 1e6 * (server_cpu + db_cpu) / max(rps * wall, 1)}


# --- main ---------------------------------------------------------------------------------


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({model}), Linux {os.uname().release}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (max 5)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="certpub worker processes")
    parser.add_argument("--serial", type=lambda s: int(s, 0), default=0x1000)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--targets", default="certpub,floor,nginx,openssl")
    parser.add_argument("--scenarios", default="get,post,nonce")
    parser.add_argument("--certpub-config", action="append", default=[], metavar="NAME=CONFIG",
                        help="one more certpub target, called NAME, from CONFIG instead of "
                        "DATA/certpub.toml (repeatable; e.g. bench/pg_env.py's PostgreSQL store)")
    parser.add_argument("--certpub-root", action="append", default=[], metavar="NAME=DIR",
                        help="one more certpub target, called NAME, run from the checkout DIR "
                        "(its .venv): A/B of two versions in the same rotation (repeatable)")
    parser.add_argument("--db-pid", action="append", default=[], metavar="NAME=PID",
                        help="count PID's process tree (e.g. bench/pg_env.py's PostgreSQL "
                        "postmaster) as target NAME's server CPU; also reported alone (db cpu)")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument("--crl-urls", type=Path, default=None, metavar="WORK",
                        help="instead: the issue-23 scenario (bench/crl_urls.py) in WORK: CRLs"
                        " and CA certificates at the certificates' URLs vs certpub's cached OCSP"
                        " GET and vs nginx (DATA not needed)")
    parser.add_argument("--big-entries", type=int, default=280_000,
                        help="entries of --crl-urls's big CRL (280,000: ~10 MB)")
    args = parser.parse_args()
    args.duration = min(args.duration, 5)
    if args.crl_urls is not None:
        import crl_urls

        crl_urls.main(args, sys.modules[__name__])
        return
    if args.data is None:
        parser.error("DATA is required (unless --crl-urls)")
    data = args.data.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="ocsp-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    reqs = make_requests(data, args.serial)
    files = {"plain": work / "req.der", "nonce_prefix": work / "req-nonce-prefix.der",
             "get.lua": work / "get.lua", "post.lua": work / "post.lua",
             "nonce.lua": work / "nonce.lua"}
    files["plain"].write_bytes(reqs["plain"])
    files["nonce_prefix"].write_bytes(reqs["nonce_prefix"])
    files["get.lua"].write_text(LUA_GET + LUA_RESOLVE)
    files["post.lua"].write_text(LUA_POST + LUA_RESOLVE)
    files["nonce.lua"].write_text(LUA_NONCE + LUA_RESOLVE)
    get_path = "/" + urllib.parse.quote(base64.b64encode(reqs["plain"]).decode(), safe="")
    files["get_path"] = Path(get_path)  # carried as text

    wanted = args.targets.split(",")
    for spec in args.db_pid:
        name, _, db = spec.partition("=")
        DB_PIDS[name] = int(db)
    targets: list[Target] = []
    try:
        certpub = Certpub(data, work, args.workers)
        targets.append(certpub)
        for spec in args.certpub_config:
            name, _, config = spec.partition("=")
            targets.append(Certpub(data, work, args.workers, name=name, config=Path(config)))
            wanted.append(name)
        for spec in args.certpub_root:
            name, _, root = spec.partition("=")
            targets.append(Certpub(data, work, args.workers, name=name, root=Path(root)))
            wanted.append(name)
        post = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                b"Content-Length: %d\r\n\r\n" % len(reqs["plain"]) + reqs["plain"])
        code, presigned = http_exchange(certpub.port, post)
        assert code == 200
        check_response(presigned)
        if "floor" in wanted or "floor-direct" in wanted:  # certpub's own keep-alive answers,
            get_req = b"GET " + get_path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"  # as the
            _, get_bytes, _ = http_raw(certpub.port, get_req)  # floor's fixed bytes
            _, post_bytes, _ = http_raw(certpub.port, post)
            if "floor" in wanted:
                targets.append(Floor(work, get_bytes, post_bytes))
            if "floor-direct" in wanted:
                targets.append(Floor(work, get_bytes, post_bytes, direct=True))
        if "nginx" in wanted:
            targets.append(Nginx(work, presigned))
        if "openssl" in wanted:
            targets.append(OpensslOcsp(data, work))
        targets = [t for t in targets if t.name in wanted]
        nonce = os.urandom(32)
        body = reqs["nonce_prefix"] + nonce
        for t in targets:  # every target answers correctly before anything is timed
            code, der = http_exchange(t.port, b"GET " + get_path.encode() + b" HTTP/1.0\r\n\r\n")
            assert code == 200, (t.name, code)
            check_response(der)
            if t.name not in ("nginx", "floor", "floor-direct"):
                code, der = http_exchange(
                    t.port, b"POST / HTTP/1.0\r\nContent-Type: application/ocsp-request\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
                check_response(der, nonce)
        scenarios = args.scenarios.split(",")
        runs: list[dict[str, object]] = []
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                for sc in scenarios:
                    if t.name in ("nginx", "floor", "floor-direct") and sc == "nonce":
                        continue
                    res = run_wrk(t, sc, files, args)
                    runs.append({"round": r, "target": t.name, "scenario": sc, **res})
                    print(f"round {r} {t.name:8} {sc:6} {res['rps']:9.0f} req/s"
                          f"  p99 {res['p99'] * 1000:7.2f} ms  wrk cpu {res['wrk_cpu']:.2f}"
                          f"  server cpu {res['server_cpu']:.2f}"
                          f" ({res['server_us_per_req']:.0f} µs/req"
                          + (f", db {res['db_cpu']:.2f}" if t.name in DB_PIDS else "") + ")"
                          f"  non2xx {res['non2xx']} errors {res['sock_errors']}", flush=True)
    finally:
        for t in targets:
            t.stop()

    def med(target: str, sc: str, key: str) -> float | None:
        vals = [float(x[key]) for x in runs if x["target"] == target and x["scenario"] == sc]
        return statistics.median(vals) if vals else None

    print(f"\nmachine: {machine()}; wrk -t1 -c{args.connections} -d{args.duration}s,"
          f" {args.rounds} rounds, certpub workers={args.workers}\n")
    print("| scenario | target | req/s (median) | p99 ms | wrk CPU | server CPU | of it db |"
          " µs CPU/req | × openssl | × floor | × nginx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sc in scenarios:
        for tn in [x.name for x in targets]:
            rps = med(tn, sc, "rps")
            if rps is None:
                continue
            o = med("openssl", sc, "rps")
            n = med("nginx", "get" if sc == "nonce" else sc, "rps")
            fl = med("floor", sc, "rps")
            print(f"| {sc} | {tn} | {rps:,.0f} | {med(tn, sc, 'p99') * 1000:.2f} |"  # type: ignore[operator]
                  f" {med(tn, sc, 'wrk_cpu'):.2f} | {med(tn, sc, 'server_cpu'):.2f} |"
                  f" {med(tn, sc, 'db_cpu'):.2f} | {med(tn, sc, 'server_us_per_req'):.0f} |"
                  f" {rps / o if o else float('nan'):.2f} | {rps / fl if fl else float('nan'):.2f} |"
                  f" {rps / n if n else float('nan'):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {
            "data": str(data), "work": str(work), "json": str(args.json)}, "runs": runs},
            indent=1, default=str))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

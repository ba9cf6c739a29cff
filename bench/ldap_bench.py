"""LDAP searches/s and p99 latency: certpub vs slapd, same data, same run, alternating rounds.

Usage:
  python bench/gen_certs.py DATA N && certpub import --config DATA/certpub.toml --openssl \
      && certpub import --config DATA/certpub.toml DATA/crl.pem && python bench/gen_ldif.py DATA
  python bench/ldap_bench.py DATA [--connections 1,16,64] [--rounds 3] [--seconds 3]
                             [--window 8] [--clients 2] [--kinds mail,base] [--json OUT]
                             [--distinct 4096] [--cold] [--padded-msgid]

Two searches, both asking for ``userCertificate;binary`` only:
  mail  base c=MO, scope sub, (mail=user<random i>@bench.example)  — one entry
  base  base cn=User <random i>,ou=Bench,o=Bench,c=MO, scope base, (objectClass=*)
certpub is started from a copy of DATA/certpub.toml (LDAP on a free 127.0.0.1 port chosen
now, HTTP too, ``[log] level = "warn"``: no per-operation log lines); slapd from
``bench/slapd_env.py`` (mdb, eq indexes on mail and cn, ``loglevel 0``) over DATA/bench.ldif.

The load generator: ``--clients`` processes (fork), each driving its share of the
connections with raw blocking sockets and one epoll loop; requests are pre-encoded BER (only
the 4-byte messageID changes), ``--distinct`` of them per process (default 4,096, drawn at
random from all users, the same in every round of a setting): certpub serves repeats from its
pre-encoded answers (``server/ldap/answers.py``), so a ``--distinct`` larger than that cache
holds (``[ldap] answer_cache_mib``, ~1.7 KiB an answer) measures its miss path; each connection keeps ``--window`` searches outstanding
(pipelined; certpub allows 16 per connection). A round is 0.5 s of warm-up plus ``--seconds``
measured; searches completed in the measured window count, their latency is send → the
SearchResultDone. Rounds alternate which server goes first; figures are medians of the rounds.
The client processes' CPU time (os.times, user+system) over the measured window is printed as
a percentage of one core, and so is the server's (from /proc/PID/stat, the whole process
tree), so a reader can judge whether the load generator was the bottleneck: on a 2-core
machine client and server share the cores. "µs/op" is the server's CPU time per search (its
CPU over the window / searches completed): the efficiency figure, least disturbed by other
load. "machine" is the CPU use of everything on the machine during the window (/proc/stat),
so a round disturbed by other work shows. Memory: VmRSS/VmHWM of the server's process tree
(certpub's supervisor and workers, slapd's one process) when idle, after a warm-up (1 s of
each search at 16 connections) and at the end.

Page cache: slapadd has just written slapd's database, so its pages are in the OS page cache
when the rounds start, while certpub's store may be anywhere between cold and hot (at 1,000,000
certificates a search that misses the answers reads ~5 random pages of a 1.7 GB file). So
before the warm-up the bench reads certpub's SQLite store (and WAL) once (a PostgreSQL store
from ``bench/pg_env.py`` was just copied in, like slapd's) and prints how much of the servers'
data files is resident at the start, after that read and at the end (``fincore``; slapd's
mdb file is sparse, its size is the configured maximum);
``--cold`` skips the read, to measure a store that is not cached.

``--padded-msgid`` numbers requests from 1 and still sends each messageID in 4 octets
(``02 04 00 00 00 01``: leading zero octets, not DER, as some clients send; slapd takes them),
to measure that such requests reach certpub's pre-encoded answers too.

More certpub servers in the same rounds: ``--certpub-config NAME=CONFIG`` (repeatable) starts one
from CONFIG instead of DATA/certpub.toml, e.g. the PostgreSQL variant written by
``bench/pg_env.py``; ``--db-pid NAME=PID`` counts PID's process tree (that PostgreSQL server) as
part of NAME's server CPU and µs/op, also shown alone ("db"). ``--servers certpub`` leaves slapd
out; a name matching neither server (``--servers none``) runs only the ``--certpub-config`` ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slapd_env import Slapd, free_port

TICK = os.sysconf("SC_CLK_TCK")
ATTRS = ["userCertificate;binary"]

# --- BER, just enough for the requests --------------------------------------------------------


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _len(len(content)) + content


def search_op(base: str, scope: int, filt: bytes, attrs: list[str]) -> bytes:
    body = (_tlv(0x04, base.encode()) + _tlv(0x0A, bytes((scope,))) + _tlv(0x0A, b"\x00")
            + _tlv(0x02, b"\x00") + _tlv(0x02, b"\x00") + _tlv(0x01, b"\x00") + filt
            + _tlv(0x30, b"".join(_tlv(0x04, a.encode()) for a in attrs)))
    return _tlv(0x63, body)


def eq_filter(attr: str, value: str) -> bytes:
    return _tlv(0xA3, _tlv(0x04, attr.encode()) + _tlv(0x04, value.encode()))


def request(kind: str, i: int) -> bytes:
    """A pre-encoded LDAPMessage without its messageID: prefix + op (messageID goes between)."""
    if kind == "mail":
        op = search_op("c=MO", 2, eq_filter("mail", f"user{i}@bench.example"), ATTRS)
    else:
        op = search_op(f"cn=User {i},ou=Bench,o=Bench,c=MO", 0, _tlv(0x87, b"objectClass"), ATTRS)
    return op


def message(msgid: int, op: bytes) -> bytes:
    # messageID always 4 bytes (IDs from 0x01000000 on, minimal BER), so only it varies
    return b"\x30" + _len(6 + len(op)) + b"\x02\x04" + msgid.to_bytes(4, "big") + op


# --- one client process -----------------------------------------------------------------------


def client(port: int, conns: int, kind: str, users: int, window: int, t_meas: float,
           t_end: float, seed: int, out: mp.Queue, distinct: int = 4096,
           first_id: int = 0x01000000) -> None:
    rng = random.Random(seed)
    ops = [request(kind, rng.randrange(users)) for _ in range(distinct)]
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    state = {}
    next_id = first_id  # below 0x01000000 the 4 octets carry leading zeros (--padded-msgid)
    k = 0
    now = time.monotonic
    for s in socks:
        sent: dict[int, float] = {}
        batch = []
        for _ in range(window):
            sent[next_id] = now()
            batch.append(message(next_id, ops[k % distinct]))
            next_id += 1
            k += 1
        s.sendall(b"".join(batch))
        state[s.fileno()] = (s, bytearray(), sent, {})
        sel.register(s, selectors.EVENT_READ)
    lat = array("d")
    done = errors = entries = 0
    cpu0 = cpu1 = None
    measuring = False
    while True:
        t = now()
        if not measuring and t >= t_meas:
            measuring = True
            c = os.times()
            cpu0 = c.user + c.system
        if t >= t_end:
            break
        for key, _ in sel.select(0.05):
            s, buf, sent, got = state[key.fd]
            data = s.recv(262144)
            if not data:
                raise SystemExit("server closed the connection")
            buf += data
            pos = 0
            n = len(buf)
            batch = []
            while n - pos >= 2:
                b1 = buf[pos + 1]
                if b1 < 0x80:
                    hl, total = 2, 2 + b1
                else:
                    nb = b1 & 0x7F
                    if n - pos < 2 + nb:
                        break
                    hl = 2 + nb
                    total = hl + int.from_bytes(buf[pos + 2 : pos + hl], "big")
                if n - pos < total:
                    break
                p = pos + hl  # messageID: 02 len value
                il = buf[p + 1]
                msgid = int.from_bytes(buf[p + 2 : p + 2 + il], "big")
                tag = buf[p + 2 + il]
                if tag == 0x64:
                    got[msgid] = got.get(msgid, 0) + 1
                elif tag == 0x65:
                    # resultCode: tag 0x65, length (1 or more bytes), then 0a 01 code
                    q = p + 3 + il
                    q += 1 if buf[q] < 0x80 else 1 + (buf[q] & 0x7F)
                    code = buf[q + 2]
                    t_done = now()
                    t_sent = sent.pop(msgid)
                    n_entries = got.pop(msgid, 0)
                    if t_sent >= t_meas and t_done < t_end:
                        lat.append(t_done - t_sent)
                        done += 1
                        entries += n_entries
                        if code:
                            errors += 1
                    if t_done < t_end:
                        sent[next_id] = t_done
                        batch.append(message(next_id, ops[k % distinct]))
                        next_id += 1
                        k += 1
                pos += total
            del buf[:pos]
            if batch:
                s.sendall(b"".join(batch))
    c = os.times()
    cpu1 = c.user + c.system
    for s in socks:
        s.close()
    out.put({"done": done, "errors": errors, "entries": entries, "lat": lat.tobytes(),
             "cpu": (cpu1 - cpu0) if cpu0 is not None else 0.0})


# --- servers ------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (certpub may run worker processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


# server pid -> pid of a database server it uses (its process tree's CPU counts as the server's)
DB_PIDS: dict[int, int] = {}


def db_cpu_seconds(pid: int) -> float:
    return cpu_seconds(DB_PIDS[pid], own=True) if pid in DB_PIDS else 0.0


def cpu_seconds(pid: int, own: bool = False) -> float:
    """CPU seconds of pid's process tree, plus its database server's (DB_PIDS) unless own."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK + (0.0 if own else db_cpu_seconds(pid))


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def memory_mib(pid: int) -> dict[str, Any]:
    """VmRSS and VmHWM (MiB), summed over the process tree."""
    out: dict[str, Any] = {"rss": 0.0, "hwm": 0.0, "processes": 0, "rss_each": []}
    for p in tree_pids(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for field, name in (("VmRSS", "rss"), ("VmHWM", "hwm")):
            m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
            if m:
                out[name] += int(m.group(1)) / 1024
                if name == "rss":
                    out["rss_each"].append(round(int(m.group(1)) / 1024, 1))
        out["processes"] += 1
    return out


def data_files(server: str, obj: Any) -> list[Path]:
    """The files a server's answers are read from: certpub's SQLite store (with its WAL),
    slapd's mdb; none for a PostgreSQL store (its cluster was just loaded: in memory)."""
    if server == "slapd":
        return sorted((obj.dir / "db").glob("*.mdb"))
    m = re.search(r'^\s*path\s*=\s*"([^"]+)"', obj.config.read_text(), re.MULTILINE)
    if m is None:
        return []
    store = Path(m.group(1))
    return [f for f in (store, Path(f"{store}-wal")) if f.exists()]


def warm(files: list[Path]) -> None:
    """Read files once, so their pages are in the OS page cache (as slapadd leaves slapd's)."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass


def resident(files: list[Path]) -> dict[str, float]:
    """MiB of files in the OS page cache and in all (fincore, util-linux); {} without it."""
    if not files or shutil.which("fincore") is None:
        return {}
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE",
                          *map(str, files)], capture_output=True, text=True, check=False).stdout
    res = size = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            res, size = res + int(parts[0]), size + int(parts[1])
    return {"resident_mib": res / 2**20, "size_mib": size / 2**20}


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


class Certpub:
    def __init__(self, config: Path, log_level: str, extra: list[str],
                 pythonpath: str | None = None) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-certpub-"))
        text = config.read_text()
        section = ""
        lines = []
        for line in text.splitlines():
            m = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
            if m:
                section = m.group(1).strip()
            if section == "ldap" and line.strip().startswith("listen"):
                line = f'listen = ["tcp:{self.port}:interface=127.0.0.1"]'
            elif section == "http" and line.strip().startswith("listen"):
                line = f'listen = ["tcp:{self.http_port}:interface=127.0.0.1"]'
            lines.append(line)
        if not re.search(r"^\[log\]", text, re.MULTILINE):
            lines += ["", "[log]", f'level = "{log_level}"', f'file = "{self.dir}/certpub.log"']
        self.config = self.dir / "certpub.toml"
        self.config.write_text("\n".join(lines) + "\n")
        exe = shutil.which("certpub") or str(Path(sys.executable).parent / "certpub")
        cmd = [exe, "serve"]
        env = None
        if pythonpath:  # another checkout of certpub (e.g. the code before a change)
            cmd = [sys.executable, "-m", "server.cli", "serve"]
            env = dict(os.environ, PYTHONPATH=pythonpath)
        with open(self.dir / "stdout.log", "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([*cmd, "--config", str(self.config), *extra], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        wait_port(self.port, self.proc)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- rounds ---------------------------------------------------------------------------------------


def run_round(port: int, pid: int, conns: int, kind: str, users: int, window: int,
              clients: int, seconds: float, seed: int, distinct: int = 4096,
              first_id: int = 0x01000000) -> dict[str, float]:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    procs = min(clients, conns)
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    t_meas = time.monotonic() + 0.3 + 0.5  # connect, then 0.5 s of warm-up
    t_end = t_meas + seconds
    workers = [ctx.Process(target=client, args=(port, n, kind, users, window, t_meas, t_end,
                                                seed * 100 + i, q, distinct, first_id))
               for i, n in enumerate(shares)]
    for w in workers:
        w.start()
    time.sleep(max(0.0, t_meas - time.monotonic()))
    s0, d0 = cpu_seconds(pid), db_cpu_seconds(pid)
    m0 = machine_busy()
    time.sleep(max(0.0, t_end - time.monotonic()))
    s1, d1 = cpu_seconds(pid), db_cpu_seconds(pid)
    m1 = machine_busy()
    results = [q.get(timeout=30) for _ in workers]
    for w in workers:
        w.join(10)
    lat = array("d")
    for r in results:
        lat.frombytes(r["lat"])
    lat_sorted = sorted(lat)
    done = sum(r["done"] for r in results)
    p99 = lat_sorted[min(len(lat_sorted) - 1, int(len(lat_sorted) * 0.99))] if lat_sorted else 0
    return {"rate": done / seconds, "p99_ms": p99 * 1000,
            "p50_ms": lat_sorted[len(lat_sorted) // 2] * 1000 if lat_sorted else 0,
            "errors": sum(r["errors"] for r in results),
            "entries_per_search": sum(r["entries"] for r in results) / max(done, 1),
            "client_cpu_pct": 100 * sum(r["cpu"] for r in results) / seconds,
            "server_cpu_pct": 100 * (s1 - s0) / seconds,
            "server_us_per_search": 1e6 * (s1 - s0) / max(done, 1),
            # the database server's part of the two above (0 without --db-pid)
            "db_cpu_pct": 100 * (d1 - d0) / seconds,
            "db_us_per_search": 1e6 * (d1 - d0) / max(done, 1),
            # all processes on the machine, in % of one core (200 = both cores of 2 busy)
            "machine_cpu_pct": 100 * (os.cpu_count() or 1) * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])}


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a gen_certs.py directory, imported, with bench.ldif")
    ap.add_argument("--connections", default="1,16,64")
    ap.add_argument("--kinds", default="mail,base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=8, help="outstanding searches per connection")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--distinct", type=int, default=4096,
                    help="distinct requests each client process cycles through (drawn at random"
                         " from all users); more than certpub's answer cache holds measures"
                         " its miss path")
    ap.add_argument("--cold", action="store_true",
                    help="do not read the servers' data files into the page cache first")
    ap.add_argument("--servers", default="certpub,slapd")
    ap.add_argument("--log-level", default="warn", help="certpub's [log] level")
    ap.add_argument("--certpub-arg", action="append", default=[],
                    help="extra argument for certpub serve (repeatable)")
    ap.add_argument("--certpub-pythonpath", help="run certpub from this source tree instead")
    ap.add_argument("--certpub-config", action="append", default=[], metavar="NAME=CONFIG",
                    help="one more certpub server, called NAME, from CONFIG instead of "
                    "DATA/certpub.toml (repeatable; e.g. a PostgreSQL store from bench/pg_env.py)")
    ap.add_argument("--db-pid", action="append", default=[], metavar="NAME=PID",
                    help="count PID's process tree (e.g. the PostgreSQL postmaster of "
                    "bench/pg_env.py) as server NAME's CPU; also reported alone (db%%, db µs)")
    ap.add_argument("--padded-msgid", action="store_true",
                    help="messageIDs from 1, each in 4 octets (02 04 00 00 00 01): not DER")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    assert args.seconds <= 5, "each round is bounded at 5 s"
    data = args.data.resolve()
    with open(data / "index.txt") as index:
        users = sum(1 for _ in index)
    servers: dict[str, tuple[int, int]] = {}
    files: dict[str, list[Path]] = {}
    closers = []
    report: dict[str, object] = {
        "machine": {"nproc": os.cpu_count(), "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")), "?")},
        "certificates": users, "window": args.window, "clients": args.clients,
        "seconds": args.seconds, "rounds": args.rounds, "certpub_args": args.certpub_arg,
        "log_level": args.log_level, "certpub_configs": args.certpub_config}
    try:
        names = args.servers.split(",")
        if "certpub" in names:
            cp = Certpub(data / "certpub.toml", args.log_level, args.certpub_arg,
                         args.certpub_pythonpath)
            closers.append(cp.close)
            servers["certpub"] = (cp.port, cp.pid)
            files["certpub"] = data_files("certpub", cp)
        for spec in args.certpub_config:
            name, _, config = spec.partition("=")
            cp = Certpub(Path(config), args.log_level, args.certpub_arg, args.certpub_pythonpath)
            closers.append(cp.close)
            servers[name] = (cp.port, cp.pid)
            files[name] = data_files(name, cp)
        if "slapd" in names:
            sl = Slapd(data / "bench.ldif").__enter__()
            closers.append(lambda: sl.__exit__(None, None, None))
            servers["slapd"] = (sl.port, sl.pid)
            files["slapd"] = data_files("slapd", sl)
            report["slapadd"] = sl.slapadd
            a = sl.slapadd
            print(f"slapadd: {a['entries']:.0f} entries in {a['seconds']:.2f} s = "
                  f"{a['entries_per_s']:.0f} entries/s (peak RSS {a['peak_rss_mib']:.0f} MiB)")
        for spec in args.db_pid:
            name, _, db = spec.partition("=")
            DB_PIDS[servers[name][1]] = int(db)
        report["db_pids"] = args.db_pid
        cache: dict[str, dict[str, dict[str, float]]] = {
            n: {"start": resident(f)} for n, f in files.items()}
        if not args.cold:
            for name, f in files.items():
                if name != "slapd":  # slapadd just wrote it (and its file is sparse: 8 GiB)
                    warm(f)
                    cache[name]["warmed"] = resident(f)
        report["page_cache"] = cache
        mem: dict[str, dict[str, dict[str, Any]]] = {}
        for name, (port, pid) in servers.items():
            mem[name] = {"idle": memory_mib(pid)}
            run_round(port, pid, 16, "mail", users, args.window, args.clients, 1.0, 1)  # warm-up
            run_round(port, pid, 16, "base", users, args.window, args.clients, 1.0, 2)
            mem[name]["after_warmup"] = memory_mib(pid)
        results: dict[str, dict[str, object]] = {}
        conns_list = [int(c) for c in args.connections.split(",")]
        for conns in conns_list:
            for kind in args.kinds.split(","):
                rounds: dict[str, list[dict[str, float]]] = {n: [] for n in servers}
                for r in range(args.rounds):
                    order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                    if len(servers) > 2:  # rotate, so each server goes first in turn
                        order = list(servers)[r % len(servers):] + list(servers)[:r % len(servers)]
                    for name in order:
                        port, pid = servers[name]
                        res = run_round(port, pid, conns, kind, users, args.window, args.clients,
                                        args.seconds, 1000 + r, args.distinct,
                                        1 if args.padded_msgid else 0x01000000)
                        rounds[name].append(res)
                        print(f"  {name:8} conns={conns:<3} {kind:5} round {r + 1}: "
                              f"{res['rate']:8.0f}/s p99 {res['p99_ms']:7.2f} ms  "
                              f"client CPU {res['client_cpu_pct']:4.0f}%  "
                              f"server CPU {res['server_cpu_pct']:4.0f}%  "
                              + (f"(db {res['db_cpu_pct']:3.0f}%)  " if pid in DB_PIDS else "") +
                              f"machine {res['machine_cpu_pct']:4.0f}%", flush=True)
                results[f"{kind}/{conns}"] = {n: {"median": median_of(v), "rounds": v}
                                              for n, v in rounds.items()}
        for name, (_port, pid) in servers.items():
            mem[name]["end"] = memory_mib(pid)
        for name, f in files.items():
            cache[name]["end"] = resident(f)
        report["results"] = results
        report["memory_mib"] = mem
    finally:
        for close in reversed(closers):
            close()
    print(f"\n{users} certificates; {os.cpu_count()} CPUs shared by server and load generator; "
          f"window {args.window}/connection, {args.clients} client processes, "
          f"medians of {args.rounds} rounds of {args.seconds:g} s")
    head = f"{'search':6} {'conns':>5} |"
    for name in servers:
        head += f" {name + ' /s':>12} {'p99 ms':>7} {'cli%':>5} {'srv%':>5} {'µs/op':>6} |"
    if len(servers) == 2:
        head += " ratio (certpub/slapd searches/s)"
    print(head)
    for key, per in results.items():
        kind, conns = key.split("/")
        line = f"{kind:6} {conns:>5} |"
        for name in servers:
            m = per[name]["median"]
            line += (f" {m['rate']:12.0f} {m['p99_ms']:7.2f} {m['client_cpu_pct']:5.0f}"
                     f" {m['server_cpu_pct']:5.0f} {m['server_us_per_search']:6.0f} |")
            if m["db_cpu_pct"]:
                line = line[:-1] + f"(db {m['db_us_per_search']:.0f} µs) |"
        if "certpub" in per and "slapd" in per:
            line += f" {per['certpub']['median']['rate'] / per['slapd']['median']['rate']:.2f}"
        print(line)
    for name, m in mem.items():
        print(f"{name} memory MiB: " + ", ".join(
            f"{k} RSS {v['rss']:.0f} (HWM {v['hwm']:.0f}; per process {v['rss_each']})"
            for k, v in m.items()))
    for name, c in report.get("page_cache", {}).items():  # type: ignore[union-attr]
        print(f"{name} data in the page cache (MiB resident/size): " + ", ".join(
            f"{k} {v['resident_mib']:.0f}/{v['size_mib']:.0f}" for k, v in c.items() if v))
    bad = [(k, n, v["median"]["errors"], v["median"]["entries_per_search"])
           for k, per in results.items() for n, v in per.items()
           if v["median"]["errors"] or abs(v["median"]["entries_per_search"] - 1) > 0.05]
    if bad:
        print(f"WARNING: errors or unexpected entry counts in {bad}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

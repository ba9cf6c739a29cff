"""A throwaway slapd (OpenLDAP 2.5, mdb backend) over an LDIF, for side-by-side benchmarks.

Usage as a script: python bench/slapd_env.py LDIF [--port N]  — imports the LDIF with slapadd,
prints the slapadd figure (entries/s, seconds, peak RSS), starts slapd on 127.0.0.1:PORT and
waits for Ctrl-C, then stops it and removes the temporary directory.

As a module: ``with Slapd(ldif, port) as s: ...`` (``s.pid``, ``s.url``, ``s.slapadd``).

Configuration (slapd.conf style, ``-f``): core, cosine and inetorgperson schemas, one mdb
database with suffix c=MO, ``index objectClass,mail,cn eq``, anonymous read access,
``loglevel 0`` (no per-operation log lines, as certpub is run with ``[log] level = "warn"``),
default thread count. Must run as root (or a user that may write the temporary directory);
slapd is started with ``-h ldap://127.0.0.1:PORT/`` and stopped with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SCHEMA = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")

CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath {modules}
moduleload back_mdb
loglevel 0
sizelimit 500
access to * by * read

database mdb
maxsize 8589934592
suffix "c=MO"
rootdn "cn=admin,c=MO"
directory {dir}/db
index objectClass eq
index mail eq
index cn eq
"""


def free_port() -> int:
    """A port nothing listens on now (127.0.0.1); the bench scripts share this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after grace seconds; returns once the process is gone."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Slapd:
    """slapadd the LDIF into a temporary mdb database, then run slapd on it."""

    def __init__(self, ldif: Path, port: int | None = None, keep: bool = False) -> None:
        self.ldif = Path(ldif)
        self.port = port or free_port()
        self.url = f"ldap://127.0.0.1:{self.port}/"
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="bench-slapd-"))
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.slapadd: dict[str, float] = {}

    def __enter__(self) -> Self:
        (self.dir / "db").mkdir()
        conf = self.dir / "slapd.conf"
        conf.write_text(CONF.format(schema=SCHEMA, dir=self.dir, modules=MODULES))
        entries = sum(1 for line in self.ldif.open("rb") if line.startswith(b"dn:"))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([SLAPADD, "-q", "-f", str(conf), "-l", str(self.ldif)], check=True,
                       stdout=subprocess.DEVNULL)
        took = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.slapadd = {"entries": entries, "seconds": took, "entries_per_s": entries / took,
                        "cpu_s": (after.ru_utime + after.ru_stime)
                        - (before.ru_utime + before.ru_stime),
                        # ru_maxrss of children is the largest child so far (KiB)
                        "peak_rss_mib": after.ru_maxrss / 1024}
        # -d 0: stay in the foreground (no detach), so this process owns and reaps it
        self.proc = subprocess.Popen([SLAPD, "-d", "0", "-f", str(conf), "-h", self.url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            if True:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("slapd did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.pid = 0
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ldif", type=Path)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    with Slapd(args.ldif, args.port) as s:
        a = s.slapadd
        print(f"slapadd: {a['entries']:.0f} entries in {a['seconds']:.2f} s = "
              f"{a['entries_per_s']:.0f} entries/s, cpu {a['cpu_s']:.2f} s, "
              f"peak RSS {a['peak_rss_mib']:.0f} MiB")
        print(f"slapd pid {s.pid} listening on {s.url} (Ctrl-C stops it)")
        signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

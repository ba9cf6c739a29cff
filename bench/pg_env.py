"""A throwaway PostgreSQL store for the benchmarks: cluster, database, copy of a bench store.

Usage:
  python bench/pg_env.py DATA [--threads 8] [--out DIR] -- COMMAND ...   # run COMMAND, then stop
  python bench/pg_env.py DATA [--threads 8] [--out DIR]                  # hold until Ctrl-C/SIGTERM

DATA is a ``bench/gen_certs.py`` directory whose store is imported (DATA/store.sqlite3). The
script starts a PostgreSQL cluster with ``tests/pg.py`` (initdb in /tmp, a free 127.0.0.1
port, trust auth, fsync off — a benchmark store, not a durable one; run as root it runs the
server as ``postgres``), creates one database, writes DIR/certpub.toml — DATA/certpub.toml
with ``[store] path`` replaced by ``url = "postgresql://…"`` and ``threads = N`` (every other
line as it was, so the bench scripts' rewrites of ``[ldap]``/``[http]`` still apply) — and
copies DATA/store.sqlite3 into the database with ``certpub copy-store --from`` (then ANALYZE).
The config path is printed and, for COMMAND, exported as ``CERTPUB_PG_CONFIG``; ``{config}``
in COMMAND's arguments is replaced by it, ``{pgpid}`` (and ``CERTPUB_PG_PID``) by the
postmaster's pid, for the bench scripts' ``--db-pid NAME={pgpid}``: the backends serving certpub
are the postmaster's children, so their CPU counts as the server's. The cluster and DIR are removed at the end (DIR only
if the script made it).

Used by ``ldap_bench.py``/``ocsp_bench.py`` through their ``--certpub-config NAME=CONFIG``
option, e.g. SQLite and PostgreSQL side by side, alternating rounds:
  python bench/pg_env.py DATA -- python bench/ldap_bench.py DATA --servers certpub \\
      --certpub-config certpub-pg={config} --db-pid certpub-pg={pgpid}
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.pg import PgCluster, find_bindir  # the tests' cluster helper


def pg_config(sqlite_config: str, url: str, threads: int) -> str:
    """The text of sqlite_config with its ``[store]`` table pointing at url."""
    out: list[str] = []
    section = ""
    for line in sqlite_config.splitlines():
        m = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
        if m:
            section = m.group(1).strip()
            out.append(line)
            if section == "store":
                out += [f'url = "{url}"', f"threads = {threads}"]
            continue
        if section == "store" and re.match(r"\s*(path|url|read_url|threads)\s*=", line):
            continue
        out.append(line)
    if not any(re.match(r"\s*\[store\]\s*$", ln) for ln in out):
        out = ["[store]", f'url = "{url}"', f"threads = {threads}", "", *out]
    return "\n".join(out) + "\n"


def certpub_cmd() -> list[str]:
    exe = shutil.which("certpub") or str(Path(sys.executable).parent / "certpub")
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "server.cli"]


class PgEnv:
    """Start a cluster, make DIR/certpub.toml for DATA's store copied into it; stop() undoes."""

    def __init__(self, data: Path, *, threads: int = 8, out: Path | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
        self.made_out = out is None
        self.out = out or Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.cluster = PgCluster.start(bindir)
        try:
            self.url = self.cluster.create_database()
            self.config = self.out / "certpub.toml"
            self.config.write_text(pg_config((data / "certpub.toml").read_text(), self.url, threads))
            t0 = time.monotonic()
            subprocess.run([*certpub_cmd(), "copy-store", "--from", str(data / "store.sqlite3"),
                            "--config", str(self.config)], check=True)
            self.copy_seconds = time.monotonic() - t0
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("ANALYZE")
            print(f"copy-store: {self.copy_seconds:.1f} s; config {self.config}", file=sys.stderr)
        except BaseException:
            self.stop()
            raise

    @property
    def postmaster_pid(self) -> int:
        """The server's pid (its backends are its children: CPU of the tree = the database's)."""
        assert self.cluster.folder is not None
        return int((self.cluster.folder / "data" / "postmaster.pid").read_text().split()[0])

    @property
    def server_log(self) -> Path | None:
        return self.cluster.folder / "server.log" if self.cluster.folder else None

    def stop(self) -> None:
        self.cluster.stop()
        if self.made_out:
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    argv = sys.argv[1:]
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a gen_certs.py directory with an imported store")
    ap.add_argument("--threads", type=int, default=8, help="[store] threads for the servers")
    ap.add_argument("--out", type=Path, help="where to write certpub.toml (default: a temp dir)")
    args = ap.parse_args(argv)
    env = PgEnv(args.data.resolve(), threads=args.threads, out=args.out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(env.config, flush=True)
        if command:
            pid = str(env.postmaster_pid)
            cmd = [a.replace("{config}", str(env.config)).replace("{pgpid}", pid) for a in command]
            rc = subprocess.call(cmd, env=dict(os.environ, CERTPUB_PG_CONFIG=str(env.config),
                                               CERTPUB_PG_PID=pid))
            sys.exit(rc)
        print("PostgreSQL store ready; Ctrl-C to remove it", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        env.stop()


if __name__ == "__main__":
    main()

"""A throwaway PostgreSQL cluster for tests: initdb in a temporary folder, one port, trust auth.

Strategy: the cluster is started once per session (``PgCluster.start``) from the PostgreSQL
binaries on this machine, as the ``postgres`` user when the tests run as root (initdb refuses
root); each test gets a database of its own (``create_database``). With
``CERTPUB_TEST_PG_URL`` set, that server is used instead (its user needs CREATEDB).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PG_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/usr/pgsql-*/bin")


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl (newest version first), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for pattern in PG_GLOBS:
        for d in sorted(glob.glob(pattern), reverse=True):
            if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
                return Path(d)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class PgCluster:
    """A running PostgreSQL server that tests may create databases in."""

    _names = itertools.count(1)

    def __init__(self, admin_url: str, *, folder: Path | None = None, bindir: Path | None = None,
                 port: int = 0, user: str | None = None) -> None:
        self.admin_url = admin_url
        self.folder = folder
        self.bindir = bindir
        self.port = port
        self.user = user  # run the server binaries as this user (None: as ourselves)

    @classmethod
    def external(cls, url: str) -> PgCluster:
        return cls(url)

    @classmethod
    def start(cls, bindir: Path) -> PgCluster:
        """initdb and start a cluster on 127.0.0.1 at a free port (fsync off: tests only)."""
        user = "postgres" if os.geteuid() == 0 else None
        # /tmp, not $TMPDIR: the postgres user must be able to reach it
        folder = Path(tempfile.mkdtemp(prefix="certpub-pg-", dir="/tmp" if user else None))
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(folder, pw.pw_uid, pw.pw_gid)
        folder.chmod(0o700)
        cluster = cls("", folder=folder, bindir=bindir, port=free_port(), user=user)
        try:
            cluster._run("initdb", "-D", str(folder / "data"), "-U", "postgres", "-A", "trust",
                         "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
            cluster._pg_ctl_start()
        except BaseException:
            cluster.stop()
            raise
        cluster.admin_url = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        return cluster

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        assert self.bindir is not None
        cmd = [str(self.bindir / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=self.folder)
        if proc.returncode != 0:
            log = ""
            if self.folder is not None and (self.folder / "server.log").exists():
                log = (self.folder / "server.log").read_text()[-2000:]
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")
        return proc.stdout

    def _pg_ctl_start(self) -> None:
        assert self.folder is not None
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                   " -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")

    def restart(self) -> None:
        """Stop the server (dropping every connection) and start it again on the same port."""
        self.stop_server()
        self.start_server()

    def stop_server(self) -> None:
        """Stop the server (``-m fast``: every connection dropped), keeping the cluster."""
        if self.folder is None:
            raise RuntimeError("cannot stop an external PostgreSQL server")
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def start_server(self) -> None:
        """Start the server again on the same port (after ``stop_server``)."""
        if self.folder is None:
            raise RuntimeError("cannot start an external PostgreSQL server")
        self._pg_ctl_start()

    def stop(self) -> None:
        if self.folder is None:
            return
        if (self.folder / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the admin."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self, *, encoding: str = "UTF8") -> str:
        """A new, empty database; its URL. The server's default collation is a linguistic
        one when ICU is there, so a column missing COLLATE "C" shows up in tests."""
        name = f"t_{os.getpid()}_{next(self._names)}"
        if encoding.upper() != "UTF8":
            self.admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING '{encoding}'"
                       " LC_COLLATE 'C' LC_CTYPE 'C'")
            return self.url(name)
        try:
            self.admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"
                       " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
        except Exception:  # noqa: BLE001 - no ICU (or an older server): the default locale
            self.admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

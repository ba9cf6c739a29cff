"""Shared fixtures: a demo PKI per session, a fresh store per test, real-client lookups."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

# CI sets this so that a real-client test can never pass by skipping.
REQUIRE_CLIENTS = os.environ.get("CERTPUB_REQUIRE_CLIENTS") == "1"

# Every process this test run starts inherits this variable, orphans included (a worker whose
# supervisor died has parent 1, not a test): that is how the end-of-session check finds them.
SESSION_MARK = "CERTPUB_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)


def leftover_processes(mark: str | None = None) -> dict[int, str]:
    """certpub processes (serve, its workers, importd...) started under this test session
    and still running: {pid: command line}. Zombies are not counted (they hold nothing)."""
    wanted = f"{SESSION_MARK}={mark or os.environ[SESSION_MARK]}".encode()
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if wanted not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rsplit(b") ", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        words = [a.decode("utf-8", "replace") for a in argv if a]
        ours = any(w == "server.cli" or os.path.basename(w) == "certpub" for w in words[:3])
        if state != b"Z" and ours:
            found[int(entry.name)] = " ".join(words)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the run when a test left a certpub process running (then kill it)."""
    yield
    if not os.path.isdir("/proc"):
        return
    import time

    end = time.monotonic() + 3.0  # a process being stopped right now gets a moment
    while (left := leftover_processes()) and time.monotonic() < end:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        pytest.fail("processes left behind by the tests (now killed):\n"
                    + "\n".join(f"  {pid} {line}" for pid, line in sorted(left.items())),
                    pytrace=False)


def skip_or_fail(message: str) -> None:
    """Skip a test whose tool or server is missing; under CI (CERTPUB_REQUIRE_CLIENTS=1), fail."""
    if REQUIRE_CLIENTS:
        pytest.fail(message + " (CERTPUB_REQUIRE_CLIENTS=1 forbids skipping)")
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of an external client; skip when missing, fail instead under CI."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def demo_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="session")
def demo_pki(tmp_path_factory: pytest.TempPathFactory, demo_now: datetime):  # type: ignore[no-untyped-def]
    """One demo PKI for the whole session (read-only: copy before changing files)."""
    from server.demo.pki import build_demo_pki

    return build_demo_pki(tmp_path_factory.mktemp("pki"), now=demo_now)


def import_demo_store(demo_pki, location, now: datetime):  # type: ignore[no-untyped-def]
    """Import the demo PKI (index files, certificates, CRLs) into a private store at location
    (an SQLite path or a PostgreSQL URL); returns location."""
    import dataclasses

    from server.config import load_config
    from store import is_postgres_url
    from importer.run import import_openssl, import_paths

    config = load_config(demo_pki.config_path)
    where = ({"url": str(location)} if is_postgres_url(location)
             else {"path": Path(location)})
    config = dataclasses.replace(config, store=dataclasses.replace(config.store, **where))
    import_openssl(config, now=lambda: now, progress=None)
    crls = [ca.crl_path for ca in demo_pki.cas.values() if ca.crl_path is not None]
    import_paths(config, crls, now=lambda: now, progress=None)
    return location


@pytest.fixture
def store_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "store" / "store.sqlite3"


# --- PostgreSQL: a throwaway cluster per session, a fresh database per test ----------------




@pytest.fixture(scope="session")
def pg_cluster():  # type: ignore[no-untyped-def]
    """A running PostgreSQL server: ``CERTPUB_TEST_PG_URL`` (a user with CREATEDB) if set,
    else a cluster initdb'd for this session; skipped (failed under CI) without PostgreSQL."""
    from tests.pg import PgCluster, find_bindir

    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg is not installed (pip install 'psycopg[binary]')")
    url = os.environ.get("CERTPUB_TEST_PG_URL")
    if url:
        yield PgCluster.external(url)
        return
    bindir = find_bindir()
    if bindir is None:
        skip_or_fail("PostgreSQL is not installed (apt-get install postgresql)")
    assert bindir is not None
    cluster = PgCluster.start(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    url = pg_cluster.create_database()
    yield url
    pg_cluster.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a test's store lives, once per engine: an SQLite path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "store" / "store.sqlite3")
    else:
        yield request.getfixturevalue("pg_url")

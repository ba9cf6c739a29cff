"""The SQLite store: WAL mode, one writer (the importer), many readers (server processes).

Strategy: every read is one indexed query returning typed records (``store.model``; the SQL
is shared with PostgreSQL in ``store.sqlbase``); every write happens inside a ``Batch``, one
``BEGIN IMMEDIATE`` transaction that takes the single writer lock, so a batch is
all-or-nothing whatever moment the process dies at. A batch that changed something takes the
next generation number and writes one change-log row per touched certificate, CRL or CA;
servers poll ``generation()`` (one row) and then ``changes_since``. Readers never see
"database is locked": WAL lets them read while the writer writes, and the busy timeout covers
checkpoints.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from store.errors import StoreError, StoreSchemaError, refuse_newer_schema, require_current_schema
from store.schema import SCHEMA_VERSION, migration
from store.sqlbase import CA_COLUMNS, CERT_COLUMNS, SqlStore
from store.sqltext import like_pattern, reversed_key, serial_int, serial_text, ts

WRITER_CACHE_KIB = 64 * 1024  # page cache of a connection that writes

# Names other modules (and tests) import from here, from before the shared base existed.
_CA_COLUMNS, _CERT_COLUMNS, _like_pattern = CA_COLUMNS, CERT_COLUMNS, like_pattern

__all__ = ["BUSY_TIMEOUT_MS", "Store", "StoreError", "StoreSchemaError", "reversed_key",
           "serial_int", "serial_text", "ts"]

BUSY_TIMEOUT_MS = 10_000
MIN_SQLITE = (3, 35, 0)  # INSERT … RETURNING


class Store(SqlStore):
    """A certpub store in one SQLite file. Not shared across threads: open one per thread."""

    engine = "sqlite"

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        super().__init__()
        self._conn = conn
        self.path = path
        self._owner = threading.get_ident()
        self._durable = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True,
             migrate: bool = True) -> Store:
        """Open (and create or migrate) the store at path.

        migrate=False refuses a store whose schema is behind (``certpub migrate`` upgrades it).
        """
        store = cls.connect(path, create=create)
        try:
            if migrate:
                store.migrate()
            else:
                store._check_current()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, create: bool = True) -> Store:
        """The store file at path, without schema checks (``certpub migrate`` starts here)."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old: certpub needs "
                f"{'.'.join(map(str, MIN_SQLITE))} or newer"
            )
        p = Path(path)
        if not create and not p.exists():
            raise StoreError(f"store {p} does not exist")
        try:
            if create:
                p.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(p), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {p}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {p}: {exc}") from exc
        return cls(conn, p)

    def close(self) -> None:
        self._conn.close()

    # --- schema -------------------------------------------------------------------------

    def schema_version(self) -> int:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return 0
        return int(row[0]) if row else (1 if self._has_table("cas") else 0)

    def _has_table(self, name: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def _run_in_migration(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A Python migration step's statement (inside the migration's transaction)."""
        return self._conn.execute(sql, tuple(params)).fetchall()

    def _check_current(self) -> None:
        try:
            current = self.schema_version()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.path}: {exc}") from exc
        require_current_schema(str(self.path), current)

    def migrate(self, target: int = SCHEMA_VERSION) -> tuple[int, int]:
        """Apply the migrations up to target in one transaction; (from, to) versions."""
        try:
            current = self.schema_version()
            refuse_newer_schema(str(self.path), current)
            if current >= target:
                return current, current
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                current = self.schema_version()  # another process may have migrated meanwhile
                for version in range(current + 1, target + 1):
                    for stmt in migration(version, "sqlite"):
                        if isinstance(stmt, str):
                            self._conn.execute(stmt)
                        else:
                            stmt(self._run_in_migration)
                    self._conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (str(version),),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot migrate store {self.path}: {exc}") from exc
        return current, max(current, target)


    # --- the engine's part of reads and writes --------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                self._reopen()
            raise StoreError(f"store read failed: {exc}") from exc

    def _reopen(self) -> None:
        """A new connection after a failed read, if one opens: a connection that read a
        corrupted file keeps failing after the file is restored in place."""
        if self._conn.in_transaction:
            return
        try:
            fresh = Store.open(self.path, create=False)
        except StoreError:
            return
        self._conn.close()
        self._conn, self._durable = fresh._conn, False
        self._hash_cache.clear()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    def _begin_write(self) -> None:
        try:
            if not self._durable:
                # The importer moves or deletes its input once a batch committed, so a commit
                # must survive power loss too; WAL with synchronous=NORMAL does not promise it.
                self._conn.execute("PRAGMA synchronous = FULL")
                # A writer's batches touch index pages all over (serials, names, attributes):
                # a larger page cache than the 2 MiB default keeps them in memory.
                self._conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
                self._durable = True
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot start a write on {self.path}: {exc}") from exc

    def _commit(self) -> None:
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:  # disk full, I/O error: the batch is rolled back
            raise StoreError(f"store write failed: {exc}") from exc

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

"""The PostgreSQL store: the same reads and the same ``Batch`` as SQLite, for many nodes.

Strategy: the SQL lives in ``store.sqlbase`` (``?`` placeholders, rewritten to ``%s`` here);
this module adds only the connection. Reads run in autocommit, one statement each, so a
server never holds a transaction open. A write batch is one transaction that first takes a
transaction-scoped advisory lock: a second importer waits for the first to commit instead of
interleaving, and generations advance exactly as on SQLite. A changing batch sends
``NOTIFY certpub_changes, '<generation>'`` inside its transaction (PostgreSQL delivers it at
commit), which ``wait_for_change`` hears on a dedicated LISTEN connection.

Never hang, never leak the password: every connection has a connect timeout, TCP keepalives
and a statement timeout; every driver error becomes a ``StoreError`` whose message has the
password scrubbed; after a lost connection the next call connects again by itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from store import redact_location
from store.model import Generation
from store.errors import StoreError, StoreSchemaError, refuse_newer_schema, require_current_schema
from store.schema import SCHEMA_VERSION, migration
from store.sqlbase import SqlStore

CHANNEL = "certpub_changes"
CONNECT_TIMEOUT = 5  # seconds
STATEMENT_TIMEOUT = "30s"  # a read or write statement; lock waits and migrations have none
# pg_advisory_xact_lock keys: "certpub" in ASCII, then 1 (writer) or 2 (migrations).
WRITE_LOCK = 0x63657274707562_01
MIGRATE_LOCK = 0x63657274707562_02
_CONNECT_DEFAULTS = {
    "connect_timeout": str(CONNECT_TIMEOUT),
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "application_name": "certpub",
}


@lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders (the shared SQL) as psycopg's ``%s``; a literal % doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


def _adapt(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL: store and look up U+FFFD instead, the same way on
    # both sides, so a name with a NUL still round-trips to itself (see README).
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def adapt_params(params: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(_adapt(v) for v in params)


def _secrets(url: str) -> list[str]:
    """The password of url in every spelling an error message might quote it in."""
    found: list[str] = []
    for pattern in (r"://[^:/@]*:([^@/]*)@", r"(?i)password=([^&\s]*)"):
        found += re.findall(pattern, url)
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.append(str(password))
    out: set[str] = set()
    for s in found:
        if s:
            out.update({s, unquote(s), quote(unquote(s), safe="")})
    return sorted(out, key=len, reverse=True)


def _rows(cursor: Any) -> list[Any]:
    """Every row of an executed statement, or none for a statement that returns none."""
    return cursor.fetchall() if cursor.description is not None else []


class PostgresStore(SqlStore):
    """A certpub store in one PostgreSQL database. One thread at a time: open one per thread."""

    engine = "postgresql"
    path = None  # no file: the SQLite store's attribute, for code that shows it

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self.location = redact_location(url)
        self._secrets = _secrets(url)
        self._conn: psycopg.Connection[Any] | None = None
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._listen_lost = False
        self._timeout_setting = STATEMENT_TIMEOUT  # as the server reports it once connected

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"

    @classmethod
    def open(cls, url: str, *, create: bool = True, migrate: bool = True) -> PostgresStore:
        """Connect to the database at url, check it, and create or migrate its tables.

        create=False refuses a database without certpub tables; migrate=False refuses a
        schema that is behind (``certpub migrate`` upgrades it).
        """
        store = cls.connect(url)
        try:
            current = store.schema_version()
            if current == 0 and not create:
                raise StoreSchemaError(
                    f"store {store.location} has no certpub tables: run `certpub migrate`"
                )
            if migrate:
                store.migrate()
            else:
                store._check_current(current)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def connect(cls, url: str) -> PostgresStore:
        """A store on url without schema checks (``certpub migrate`` starts here)."""
        store = cls(url)
        store._connection()
        return store

    # --- connections --------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, what: str, exc: BaseException) -> StoreError:
        detail = " ".join(str(exc).split())  # one line: libpq messages span several
        return StoreError(self._scrub(f"{what} ({self.location}): {detail}"))

    def _open_connection(self) -> psycopg.Connection[Any]:
        try:
            params: dict[str, Any] = dict(conninfo_to_dict(self._url))
        except psycopg.Error as exc:
            raise self._error("invalid PostgreSQL URL", exc) from None
        for key, value in _CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        params["client_encoding"] = "UTF8"
        try:
            conn = psycopg.connect(autocommit=True, **params)
        except psycopg.Error as exc:
            raise self._error("cannot connect to the store", exc) from None
        try:
            if "statement_timeout" not in str(params.get("options", "")):
                conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
            row = conn.execute(
                "SELECT current_setting('server_encoding'), current_setting('statement_timeout')"
            ).fetchone()
            encoding, self._timeout_setting = (str(row[0]), str(row[1])) if row else ("?", "0")
        except psycopg.Error as exc:
            conn.close()
            raise self._error("cannot set up the store connection", exc) from None
        if encoding.upper() not in ("UTF8", "UTF-8"):
            conn.close()
            raise StoreError(
                f"store {self.location}: the database encoding is {encoding}; certpub needs a"
                " UTF8 database (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE template0)"
            )
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one if there is none or it was lost."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._drop()
            conn = self._conn = self._open_connection()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _failed(self, conn: psycopg.Connection[Any]) -> None:
        """After an error: forget a connection that is gone, so the next call reconnects."""
        if conn.closed or conn.broken:
            self._drop()

    def close(self) -> None:
        self._drop()
        listen, self._listen_conn = self._listen_conn, None
        if listen is not None:
            try:
                listen.close()
            except psycopg.Error:
                pass

    # --- schema -------------------------------------------------------------------------

    def schema_version(self) -> int:
        rows = self._query(
            "SELECT to_regclass('meta') IS NOT NULL, to_regclass('cas') IS NOT NULL"
        )
        has_meta, has_cas = rows[0]
        if not has_meta:
            return 0
        rows = self._query("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else (1 if has_cas else 0)

    def _check_current(self, current: int) -> None:
        require_current_schema(self.location, current)

    def migrate(self, target: int = SCHEMA_VERSION) -> tuple[int, int]:
        """Apply pending migrations in one transaction; (from, to) versions.

        Two processes starting together both get here: the advisory lock makes the second
        wait, then find the schema current and change nothing.
        """
        current = self.schema_version()
        refuse_newer_schema(self.location, current)
        if current >= target:
            return current, current
        conn = self._connection()
        try:
            try:
                # No timeout: waiting for another migrator, or an index on millions of rows.
                conn.execute("SET statement_timeout = 0")
                # A session lock taken *before* the transaction: a transaction that began by
                # waiting on an advisory lock keeps stale catalog caches, and would not see
                # the tables the previous holder created.
                conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    current = self.schema_version()  # another process may have migrated
                    for version in range(current + 1, target + 1):
                        for stmt in migration(version, "postgresql"):
                            if isinstance(stmt, str):
                                conn.execute(stmt)
                            else:
                                stmt(lambda sql, params: _rows(
                                    conn.execute(to_pyformat(sql), adapt_params(params))))
                        conn.execute(
                            "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            (str(version),),
                        )
            finally:
                if not (conn.closed or conn.broken):
                    # Unlocking a lock not held (the wait failed) only warns.
                    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
                    conn.execute("SELECT set_config('statement_timeout', %s, false)",
                                 (self._timeout_setting,))
        except StoreError:
            self._failed(conn)
            raise
        except psycopg.Error as exc:
            self._failed(conn)
            raise self._error("cannot migrate the store", exc) from None
        return current, max(current, target)

    # --- the engine's part of reads and writes --------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._connection()
        try:
            return conn.execute(to_pyformat(sql), adapt_params(params)).fetchall()
        except psycopg.Error as exc:
            self._failed(conn)
            raise self._error("store read failed", exc) from None

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        conn = self._connection()
        try:
            return conn.execute(to_pyformat(sql), adapt_params(params))
        except psycopg.Error as exc:
            self._failed(conn)
            raise self._error("store write failed", exc) from None

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                cur.executemany(to_pyformat(sql), [adapt_params(r) for r in rows])
        except psycopg.Error as exc:
            self._failed(conn)
            raise self._error("store write failed", exc) from None

    def _copy(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """New rows into table with COPY (the bulk path of ``Batch``: several times faster
        than INSERT statements, even pipelined); inside the open write transaction."""
        conn = self._connection()
        try:
            with conn.cursor() as cur, \
                    cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(adapt_params(row))
        except psycopg.Error as exc:
            self._failed(conn)
            raise self._error("store write failed", exc) from None

    def _begin_write(self) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN")
            # Waiting for another importer is not a stuck statement: no timeout for the lock.
            conn.execute("SET LOCAL statement_timeout = 0")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            conn.execute("SELECT set_config('statement_timeout', %s, true)",
                         (self._timeout_setting,))
        except psycopg.Error as exc:
            self._rollback()
            raise self._error("cannot start a write", exc) from None

    def _announce(self, generation: Generation) -> None:
        self._execute("SELECT pg_notify(?, ?)", (CHANNEL, str(int(generation))))

    def _commit(self) -> None:
        conn = self._connection()
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._failed(conn)
            raise self._error("store write failed", exc) from None

    def _rollback(self) -> None:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._drop()
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            self._failed(conn)

    # --- change notifications -----------------------------------------------------------

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to timeout seconds for a committed batch; True when one was announced.

        Uses its own LISTEN connection, opened on first use. A lost connection raises
        StoreError; the next call listens again and returns True at once, since batches may
        have committed unheard meanwhile.
        """
        conn = self._listen_conn
        if conn is None or conn.closed or conn.broken:
            self._listen_conn = None
            conn = self._open_connection()
            try:
                conn.execute(f"LISTEN {CHANNEL}")
            except psycopg.Error as exc:
                conn.close()
                raise self._error("cannot listen for store changes", exc) from None
            self._listen_conn = conn
            if self._listen_lost:
                self._listen_lost = False
                return True
        try:
            for _ in conn.notifies(timeout=max(0.0, timeout), stop_after=1):
                return True
            return False
        except psycopg.Error as exc:
            self._listen_conn = None
            self._listen_lost = True
            try:
                conn.close()
            except psycopg.Error:
                pass
            raise self._error("lost the store change notifications", exc) from None

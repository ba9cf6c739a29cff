"""Copy an SQLite store into a PostgreSQL store (``certpub copy-store``), in one transaction.

Strategy: both stores are at the same schema version (each was opened, and so migrated, by
this certpub), so every table is copied column for column, parents before children, with
PostgreSQL's COPY; then the identity sequences are moved past the copied ids. The whole copy
is one transaction holding the writer lock: an importer started meanwhile waits, and an
interrupted copy leaves the destination as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from store.postgres import CHANNEL, WRITE_LOCK, PostgresStore, adapt_params
from store.errors import StoreError
from store.sqlite import Store

# Parents before children (foreign keys), every column of schema version 4.
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("meta", ("key", "value")),
    ("cas", ("id", "name", "subject_dn", "subject_key", "directory_key", "cert_der", "crl_der",
             "crl_number", "crl_this_update", "crl_next_update", "synced_at", "updated_at",
             "generation")),
    ("ca_hashes", ("ca_id", "algorithm", "name_hash", "key_hash")),
    ("certs", ("id", "ca_id", "serial", "der", "sha256", "subject_dn", "directory_dn",
               "directory_key", "emails", "cn", "not_before", "not_after", "status", "revoked_at",
               "reason", "revoked_by", "imported_at", "source", "generation")),
    ("cert_attrs", ("cert_id", "attr", "value")),
    ("entries", ("key", "rkey", "dn", "parent_key", "kind")),
    ("changes", ("generation", "kind", "ca_id", "serial", "directory_key")),
    ("imported_files", ("sha256", "name", "imported_at", "generation", "outcome")),
    ("crl_scopes", ("id", "ca_id", "idp_key", "idp", "delta", "urls", "only_kind", "der",
                    "number", "base_number", "this_update", "next_update", "updated_at",
                    "generation")),
    ("crl_holds", ("scope_id", "ca_id", "serial")),
    ("crl_pending", ("id", "ca_id", "idp_key", "der", "sha256", "number", "base_number",
                     "received_at", "source")),
    ("crl_urls", ("url", "scheme", "host", "path", "kind", "ca_id", "conflict", "pair_url",
                  "dn_key", "dn", "attr", "learnt_at", "generation")),
)
IDENTITY_TABLES = ("cas", "certs", "crl_scopes", "crl_pending")
FETCH = 2000


@dataclass
class CopySummary:
    rows: dict[str, int] = field(default_factory=dict)
    generation: int = 0

    def line(self) -> str:
        counts = ", ".join(f"{n} {t}" for t, n in self.rows.items())
        return f"copied {sum(self.rows.values())} rows ({counts}); generation {self.generation}"


def destination_rows(dst: PostgresStore) -> int:
    """Rows in the destination's data tables (meta aside): 0 for a fresh store."""
    sql = " + ".join(f"(SELECT COUNT(*) FROM {t})" for t, _ in TABLES if t != "meta")
    return int(dst._query(f"SELECT {sql}")[0][0])


def copy_store(src: Store, dst: PostgresStore, *, replace: bool = False, every: int = 10_000,
               progress: Callable[[str], None] | None = None) -> CopySummary:
    """Copy every row of src into dst; refuses a non-empty dst unless replace."""
    if src.schema_version() != dst.schema_version():
        raise StoreError(f"schema versions differ: source {src.schema_version()},"
                         f" destination {dst.schema_version()}")
    # One read transaction on the source: a consistent snapshot while an importer writes on.
    src._execute("BEGIN")
    try:
        return _copy(src, dst, replace=replace, every=every, progress=progress)
    finally:
        src._rollback()


def _copy(src: Store, dst: PostgresStore, *, replace: bool, every: int,
          progress: Callable[[str], None] | None) -> CopySummary:
    totals = {t: int(src._query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t, _ in TABLES}
    summary = CopySummary()
    conn = dst._connection()
    try:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 0")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            present = destination_rows(dst)
            if present and not replace:
                raise StoreError(f"destination {dst.location} is not empty ({present} rows):"
                                 " give --replace to overwrite it")
            conn.execute("TRUNCATE " + ", ".join(t for t, _ in TABLES))
            for table, columns in TABLES:
                summary.rows[table] = _copy_table(src, conn, table, columns, totals[table],
                                                  every, progress)
            for table in IDENTITY_TABLES:
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
            row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            summary.generation = int(row[0]) if row else 0
            # Servers on this database drop their caches: everything may have changed.
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(summary.generation)))
    except StoreError:
        dst._failed(conn)
        raise
    except psycopg.Error as exc:
        dst._failed(conn)
        raise dst._error("copy failed, the destination is unchanged", exc) from None
    return summary


def _copy_table(src: Store, conn: psycopg.Connection[Any], table: str,
                columns: tuple[str, ...], total: int, every: int,
                progress: Callable[[str], None] | None) -> int:
    cols = ", ".join(columns)
    done = 0
    try:
        cur = src._conn.execute(f"SELECT {cols} FROM {table}")
    except Exception as exc:  # sqlite3.Error
        raise StoreError(f"cannot read {table} from {src.path}: {exc}") from exc
    with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
        while True:
            rows = cur.fetchmany(FETCH)
            if not rows:
                break
            for row in rows:
                copy.write_row(adapt_params(row))
                done += 1
                if progress is not None and every and done % every == 0:
                    progress(f"{table}: {done}/{total} rows")
    if progress is not None:
        progress(f"{table}: {done} rows")
    return done

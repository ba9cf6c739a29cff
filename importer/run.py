"""The one-shot imports ``certpub import`` runs: files and folders, or the OpenSSL databases.

Strategy: ``import_paths`` (``certpub import PATH...``) never moves the user's files and
reports rejected ones by name and reason; ``import_openssl`` reads every configured OpenSSL
database (``certpub import`` without PATH, or with ``--openssl``). Both take the parsed
configuration (or ``ImportSettings``), open the store, and close everything they started.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from importer.batch import Importer
from importer.openssl_index import IndexTracker, sync_database
from importer.progress import ImportSummary, Progress
from importer.settings import ImportSettings
from store import open_store


def _skip_in_walk(name: str) -> bool:
    return name.startswith(".") or name.endswith((".tmp", ".part", ".reason"))


def collect_files(paths: Sequence[Path]) -> list[str]:
    """Files named, and files in folders named (recursively), in a stable order (the order
    of their ``Path``s). Kept as ``str``: a million ``Path`` objects took ~400 MiB."""
    out: list[str] = []
    for p in paths:
        if p.is_dir():
            # Sorted component-wise, as Path sorts: with NUL (below every character a file
            # name can hold) as the separator while sorting, then back, one string at a time.
            found: list[str] = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                base = root.replace(os.sep, "\0") + "\0"
                found += [base + f for f in files if not _skip_in_walk(f)]
            found.sort()
            for i, f in enumerate(found):
                found[i] = f.replace("\0", os.sep)
            out += found
        else:
            out.append(str(p))
    return out


def import_paths(config: Any, paths: list[Path], *, now: Callable[[], datetime],
                 progress: TextIO | None) -> ImportSummary:
    """``certpub import PATH...``: import files and folders once; the files stay where they are."""
    settings = ImportSettings.of(config)
    files = collect_files(paths)
    store = open_store(settings.location, migrate=settings.migrate)
    importer = Importer(settings, store, now,
                        progress=Progress(progress, len(files)) if progress else None)
    try:
        importer.start()
        crl_cas: set[str] = set()
        batches = ([(Path(p), p) for p in chunk]
                   for chunk in _chunks(files, settings.batch_size))
        for outcomes in importer.import_batches(batches):
            for o in outcomes:
                if o.outcome in ("rejected", "skipped"):
                    if o.outcome == "skipped":  # one-shot: unreadable counts as rejected
                        importer.summary.files += 1
                        importer.summary.rejected.append((o.name, o.reason))
                    if progress is not None:
                        print(f"\rrejected {o.name}: {o.reason}\x1b[K" if importer.progress
                              and importer.progress.tty else f"rejected {o.name}: {o.reason}",
                              file=progress)
                else:
                    crl_cas.update(o.crl_cas)
        # A CRL is a complete statement of its CA's revocations as of its thisUpdate.
        importer.mark_synced(sorted(crl_cas))
        return importer.finish()
    finally:
        importer.close()
        store.close()


def import_openssl(config: Any, *, now: Callable[[], datetime],
                   progress: TextIO | None = None) -> ImportSummary:
    """Import every configured OpenSSL CA database (index.txt and its certificate files)."""
    settings = ImportSettings.of(config)
    store = open_store(settings.location, migrate=settings.migrate)
    importer = Importer(settings, store, now)
    try:
        importer.start()
        for db in settings.openssl:
            if not db.index.is_file():
                importer.summary.rejected.append((str(db.index), "index file does not exist"))
                if progress is not None:
                    print(f"rejected {db.index}: index file does not exist", file=progress)
                continue
            lines = db.index.read_bytes().count(b"\n")
            importer.progress = Progress(progress, lines, "index lines") if progress else None
            sync_database(importer, db, IndexTracker(db.index))
            if importer.progress is not None:
                importer.progress.finish()
            importer.mark_synced([db.ca])
        importer.progress = None
        return importer.finish()
    finally:
        importer.close()
        store.close()




def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]

"""The import daemon (``certpub importd``): spool folders and OpenSSL databases, continuously.

Drop protocol (for whatever writes into a spool folder):

1. Write the file under a temporary name in the spool folder itself (same file system): a name
   starting with ``.`` or ending in ``.tmp`` or ``.part``. Such names are never read.
2. Rename it to its final name (``mv``, ``os.replace``): the rename is atomic, so the daemon
   sees either nothing or the complete file.

A file inotify reports as renamed into a spool folder (and not created or written under that
name since) is complete, and is taken at once. As a safety net for writers that ignore the
protocol (a file written in place, or copied from another file system), any other file is
taken only once its size, mtime, ctime and inode stayed the same for ``SETTLE`` seconds (over
two looks or more; a file whose size or mtime changed since the last look is still growing).
Sub-folders are scanned too (polled and settled only: inotify watches the top of each spool
folder), except ``done/`` and ``rejected/`` at the top of each spool folder.

Detection: inotify (Linux, a small ctypes binding) wakes the daemon as soon as a file is
renamed into, created in or closed in a spool folder or an index folder, so a renamed file is
taken at once and a file written in place within about ``SETTLE`` seconds; the folders are
also polled with ``os.scandir`` every ``import.poll_interval`` seconds (the only mechanism
where inotify is unavailable; then a file is taken within poll_interval + SETTLE seconds).

Crash safety: files move (``os.replace`` into ``done/``, or unlink when ``import.processed =
"delete"``) only after their batch committed, and each accepted file's SHA-256 is committed
with it. A crash between the commit and the move leaves the file in the spool, where the next
run finds it already imported and just moves it: ``kill -9`` at any moment, then a restart,
ends with the same store as an uninterrupted run. A rejected file goes to ``rejected/`` with
``<name>.reason`` beside it (written first). A name already taken in ``done/`` or
``rejected/`` gets a numeric suffix (``crl.1.pem``).

Errors (store locked, disk full, unreadable files) are logged and retried on the next cycle,
with a growing delay; the files stay in the spool. SIGTERM (via ``stop``) lets the current
batch finish, then the daemon returns.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from twisted.logger import Logger

from importer.batch import FileOutcome, Importer
from importer.formats import FileRejected
from importer.openssl_index import IndexTracker, sync_database
from importer.progress import ImportSummary
from importer.settings import ImportSettings, SetupError
from store import open_store
from store.errors import StoreError
from store.sqlbase import SqlStore

log = Logger()

SETTLE = 0.2  # seconds between the two looks that find a file complete
SYNC_INTERVAL = 30.0  # the OCSP thisUpdate (synced_at) is refreshed at least this often
MISSING_RETRY = 30.0  # seconds between looks for certificate files an index names
MAX_BACKOFF = 30.0
IDLE_POOL = 60.0  # worker processes are stopped after this long without work
SKIPPED_DIRS = frozenset({"done", "rejected"})
Signature = tuple[int, int, int, int]


def is_temporary(name: str) -> bool:
    """A name the drop protocol reserves for files still being written."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


@dataclass(frozen=True)
class SpoolFile:
    root: Path  # the spool folder it was found in
    path: Path
    name: str  # path relative to root, for logs and the store's "source"


class SpoolScanner:
    """Lists complete files: seen twice in a row with the same size, mtime, ctime and inode."""

    def __init__(self, roots: Sequence[Path], settle: float = SETTLE) -> None:
        self.roots = list(roots)
        self.settle = settle
        self._previous: dict[Path, tuple[Signature, float]] = {}  # signature, first seen
        self.ignored: dict[Path, Signature] = {}  # unreadable files, until they change

    def _walk(self, root: Path, folder: Path, out: dict[Path, tuple[SpoolFile, Signature]]) -> None:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return
        for entry in entries:
            if is_temporary(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not (folder == root and entry.name in SKIPPED_DIRS):
                        self._walk(root, Path(entry.path), out)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # moved away meanwhile
            path = Path(entry.path)
            sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            out[path] = (SpoolFile(root, path, str(path.relative_to(root))), sig)

    def scan(self, renamed: AbstractSet[Path] = frozenset()) -> tuple[list[SpoolFile], bool]:
        """(files ready to import, whether some file is still settling).

        renamed: paths known to have arrived complete, by a rename (drop protocol, step 2).
        """
        found: dict[Path, tuple[SpoolFile, Signature]] = {}
        for root in self.roots:
            self._walk(root, root, found)
        ready: list[SpoolFile] = []
        settling = False
        now = time.monotonic()
        current: dict[Path, tuple[Signature, float]] = {}
        for path, (f, sig) in found.items():
            before = self._previous.get(path)
            same = before is not None and before[0] == sig
            since = before[1] if before is not None and same else now
            current[path] = (sig, since)
            if self.ignored.get(path) == sig:
                continue
            if path in renamed or same and now - since >= self.settle:
                ready.append(f)
            else:
                settling = True
        self._previous = current
        self.ignored = {p: s for p, s in self.ignored.items() if p in found}
        ready.sort(key=lambda f: (self.roots.index(f.root), f.name))
        return ready, settling

    def signature(self, path: Path) -> Signature | None:
        seen = self._previous.get(path)
        return None if seen is None else seen[0]


# --- moving files, after the commit ---------------------------------------------------


def _free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.N.suffix when that is taken."""
    dest = folder / name
    n = 0
    while os.path.lexists(dest):
        n += 1
        base, dot, ext = name.partition(".") if not name.startswith(".") else (name, "", "")
        dest = folder / (f"{base}.{n}{dot}{ext}")
    return dest


def fsync_dir(folder: Path) -> None:
    """Make renames in folder durable (POSIX needs the directory itself synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_reason(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dispose(f: SpoolFile, o: FileOutcome, processed: str, when: datetime) -> set[Path]:
    """Move (or delete) one processed file; returns the folders to fsync."""
    if o.outcome in ("accepted", "unchanged"):
        if processed == "delete":
            os.unlink(f.path)
            return {f.path.parent}
        folder = f.root / "done"
        folder.mkdir(exist_ok=True)
        os.replace(f.path, _free_name(folder, f.path.name))
        return {f.path.parent, folder}
    if o.outcome == "rejected":
        folder = f.root / "rejected"
        folder.mkdir(exist_ok=True)
        dest = _free_name(folder, f.path.name)
        _write_reason(dest.with_name(dest.name + ".reason"),
                      f"{o.reason}\n\nfile: {f.name}\nsha256: {o.sha256.hex()}\n"
                      f"rejected: {when.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}\n")
        os.replace(f.path, dest)
        return {f.path.parent, folder}
    return set()


# --- inotify (Linux): a wake-up call, polling stays the fallback ------------------------

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x8, 0x80, 0x100
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class Inotify:
    """The few inotify(7) calls the daemon needs, through ctypes."""

    MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE  # not IN_MODIFY: one wake-up per file

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = int(self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.watched: set[Path] = set()
        self._folders: dict[int, Path] = {}
        self.renamed: set[Path] = set()  # files renamed in, not created or written since

    def watch(self, folder: Path) -> None:
        if folder in self.watched or not folder.is_dir():
            return
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), self.MASK)
        if wd >= 0:
            self.watched.add(folder)
            self._folders[wd] = folder

    def wait(self, timeout: float) -> bool:
        """Block up to timeout seconds; True when something happened."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return False
        try:
            while data := os.read(self.fd, 65536):
                self._note(data)
        except BlockingIOError:
            pass
        return True

    def _note(self, data: bytes) -> None:
        """Track renames in (complete files) against creations and writes (maybe not)."""
        p = 0
        while p + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, p)
            raw = data[p + _EVENT.size:p + _EVENT.size + length].rstrip(b"\0")
            p += _EVENT.size + length
            folder = self._folders.get(wd)
            if folder is None or not raw or mask & IN_ISDIR:
                continue
            path = folder / os.fsdecode(raw)
            if mask & IN_MOVED_TO:
                self.renamed.add(path)
            else:  # IN_CREATE, IN_CLOSE_WRITE: written under its final name, so it settles
                self.renamed.discard(path)

    def take_renamed(self) -> set[Path]:
        taken, self.renamed = self.renamed, set()
        return taken

    def close(self) -> None:
        os.close(self.fd)


# --- the daemon -----------------------------------------------------------------------


class SpoolDaemon:
    """One import daemon: scan, import in batches, move, re-read indexes, mark synced."""

    def __init__(self, config: Any, now: Callable[[], datetime], stop: threading.Event,
                 progress: TextIO | None = None) -> None:
        self.settings = settings = ImportSettings.of(config)
        self.now = now
        self.stop = stop
        self.progress = progress
        self.scanner = SpoolScanner(settings.spool)
        self.trackers = [(db, IndexTracker(db.index)) for db in settings.openssl]
        self.store: SqlStore | None = None
        self.importer: Importer | None = None
        self.inotify: Inotify | None = None
        self.last_synced = self.last_missing = self.last_work = -1e18
        self.failures = 0

    def _open(self) -> Importer:
        if self.importer is None:
            for root in self.settings.spool:
                root.mkdir(parents=True, exist_ok=True)
            store = open_store(self.settings.location, migrate=self.settings.migrate)
            importer = Importer(self.settings, store, self.now)
            try:
                importer.start()
            except BaseException:
                store.close()
                raise
            self.store, self.importer = store, importer
            log.info("import daemon ready: spool={spool} indexes={indexes} detection={detection}",
                     spool=",".join(map(str, self.settings.spool)),
                     indexes=",".join(str(db.index) for db, _ in self.trackers),
                     detection="inotify+poll" if self.inotify else "poll")
        return self.importer

    def cycle(self) -> tuple[bool, bool]:
        """One pass over spool and indexes; (did work, files still settling)."""
        importer = self._open()
        importer.summary = ImportSummary()  # per cycle: a daemon must not accumulate forever
        if self.inotify is not None:
            for root in self.scanner.roots:
                self.inotify.watch(root)
            for db, _ in self.trackers:
                self.inotify.watch(db.index.parent)
        renamed = self.inotify.take_renamed() if self.inotify is not None else set()
        ready, settling = self.scanner.scan(renamed)
        did = False
        size = self.settings.batch_size
        by_path = {f.path: f for f in ready}
        batches = ([(f.path, f.name) for f in ready[i:i + size]]
                   for i in range(0, len(ready), size))
        for outcomes in importer.import_batches(batches):
            self._dispose([by_path[o.path] for o in outcomes], outcomes)
            did = True
            if self.stop.is_set():
                return did, True  # SIGTERM: this batch is done, the rest waits
        t = time.monotonic()
        retry = t - self.last_missing >= MISSING_RETRY
        if retry:
            self.last_missing = t
        for db, tracker in self.trackers:
            if self.stop.is_set():
                break
            did = sync_database(importer, db, tracker, retry_missing=retry) or did
        if did or t - self.last_synced >= SYNC_INTERVAL:
            importer.mark_synced()
            self.last_synced = t
        if did:
            self.last_work = t
        elif t - self.last_work > IDLE_POOL:
            importer.close()  # workers come back with the next large batch
        return did, settling

    def _dispose(self, files: list[SpoolFile], outcomes: list[FileOutcome]) -> None:
        folders: set[Path] = set()
        when = self.now()
        for f, o in zip(files, outcomes, strict=True):
            if o.outcome == "skipped":
                sig = self.scanner.signature(f.path)
                if sig is not None:
                    self.scanner.ignored[f.path] = sig  # retried once it changes
                continue
            try:
                folders |= dispose(f, o, self.settings.processed, when)
            except OSError as exc:
                log.error("file {name}: cannot move it out of the spool ({error}); it is"
                          " retried (already imported, so a no-op)", name=f.name, error=str(exc))
        for folder in folders:
            fsync_dir(folder)
        if self.progress is not None and self.importer is not None:
            print(self.importer.summary.line(), file=self.progress, flush=True)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.inotify is None:
                self.stop.wait(min(remaining, 0.2))
            elif self.inotify.wait(min(remaining, 0.2)):
                self.stop.wait(0.02)  # let a burst of drops arrive before scanning
                return

    def _failed(self) -> float:
        self.failures += 1
        return float(min(self.settings.poll_interval * 2 ** self.failures, MAX_BACKOFF))

    def run(self, *, once: bool = False) -> None:
        """Cycle until stop is set (or, with once, until the spool is empty)."""
        try:
            self.inotify = Inotify()
        except (OSError, AttributeError):
            self.inotify = None  # not Linux, or no inotify: polling alone
        poll = self.settings.poll_interval
        try:
            while not self.stop.is_set():
                try:
                    did, settling = self.cycle()
                    self.failures = 0
                    delay = SETTLE if settling else poll
                except (StoreError, OSError, FileRejected, SetupError) as exc:
                    delay = self._failed()
                    log.error("import cycle failed, files stay in the spool: {error};"
                              " retrying in {delay} s", error=str(exc), delay=round(delay, 1))
                    did = settling = True
                except Exception:  # noqa: BLE001 - a bug must not stop the daemon for good
                    delay = self._failed()
                    log.failure("import cycle failed; retrying in {delay} s", delay=round(delay, 1))
                    did = settling = True
                if once and not did and not settling:
                    break
                self._wait(delay)
        finally:
            if self.importer is not None:
                self.importer.close()
            if self.store is not None:
                self.store.close()
            if self.inotify is not None:
                self.inotify.close()
            log.info("import daemon stopped")


def run_daemon(config: Any, *, now: Callable[[], datetime], stop: threading.Event,
               progress: TextIO | None = None, once: bool = False) -> None:
    """``certpub importd``: watch spool folders and index files until ``stop`` is set."""
    SpoolDaemon(config, now, stop, progress).run(once=once)

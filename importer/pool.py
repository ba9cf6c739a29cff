"""Worker processes that read, parse and verify while the importer process writes.

Strategy: the expensive, pure part of an import — reading a file, decoding PEM/DER/PKCS#7,
checking signatures, reading certificates into ``CertInput`` — runs in spawned worker
processes (one per CPU), each holding its own ``Verifier``; the importer process only
writes. Work goes out in chunks (a few dozen files) so pickling is amortised and cores stay
balanced; a handful of objects is done in-process. Workers ignore SIGINT/SIGTERM (the
importer decides when they stop) and die with the importer, even on ``kill -9``
(PR_SET_PDEATHSIG). A broken pool (a worker killed, out of memory) is not an error: the
chunk is done again in the importer process.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from twisted.logger import Logger

from importer.formats import MAX_FILE_BYTES, FileRejected, extract, read_file
from importer.verify import Anchor, Verified, Verifier
from store.lifeline import die_with_parent

log = Logger()

CHUNK = 64  # items per worker task: large enough to amortise pickling, small for balance
POOL_THRESHOLD = 128  # below this many items a job runs in the importer process


@dataclass
class FileLoad:
    """One file read and verified by a worker: what the importer decides on."""

    sha256: bytes = b""
    state: str = "read"  # read | skipped (cannot read) | large | rejected (unreadable content)
    reason: str = ""
    objects: list[Verified] = field(default_factory=list)


def load_files(verifier: Verifier, paths: Sequence[str]) -> list[FileLoad]:
    """Read each file, classify its objects by content and verify every one."""
    out = []
    for path in paths:
        load = FileLoad()
        out.append(load)
        try:
            data = read_file(path)
        except OSError as exc:
            load.state, load.reason = "skipped", f"cannot read: {exc.strerror or exc}"
            continue
        load.sha256 = hashlib.sha256(data).digest()
        if len(data) > MAX_FILE_BYTES:
            load.state, load.reason = "large", f"larger than {MAX_FILE_BYTES >> 20} MiB"
            continue
        try:
            objects = extract(data)
        except FileRejected as exc:
            load.state, load.reason = "rejected", str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - malformed input must not stall
            load.state, load.reason = "rejected", f"cannot be read ({exc!r})"
            continue
        load.objects = [verifier.check(kind, der) for kind, der in objects]
    return out


def verify_objects(verifier: Verifier, items: Sequence[tuple[str, bytes]]) -> list[Verified]:
    """Verify objects already read."""
    return [verifier.check(kind, der) for kind, der in items]


def load_certificate_files(verifier: Verifier, items: Sequence[Sequence[str]]
                           ) -> list[tuple[Verified | None, list[str]]]:
    """For each record of an index: the first of its candidate files that exists, verified.

    (None, notes) when no candidate file exists yet; notes name files that are not
    certificates (logged by the importer: workers have no log observers).
    """
    out: list[tuple[Verified | None, list[str]]] = []
    for candidates in items:
        notes: list[str] = []
        found: Verified | None = None
        for path in candidates:
            try:
                data = read_file(path)
            except OSError:
                continue
            try:
                der = next(d for kind, d in extract(data) if kind == "cert")
            except (FileRejected, StopIteration):
                notes.append(path)
                continue
            found = verifier.check("cert", der)
            break
        out.append((found, notes))
    return out


TASKS: dict[str, Callable[[Verifier, Any], list[Any]]] = {
    "files": load_files, "objects": verify_objects, "index": load_certificate_files,
}

_WORKER: Verifier | None = None


def init_worker(anchors: list[Anchor], parent: int) -> None:
    """Worker process set-up: the anchors, and die with the importer (even on kill -9)."""
    global _WORKER
    _WORKER = Verifier(anchors)
    # systemd and terminals signal the whole group; the importer decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)


def run_task(task: str, items: Sequence[Any]) -> list[Any]:
    """Worker entry point."""
    assert _WORKER is not None
    return TASKS[task](_WORKER, items)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class Job:
    """Items being worked on: futures of worker results, or nothing yet (in-process)."""

    task: str
    items: Sequence[Any]
    futures: list[Future[list[Any]]] = field(default_factory=list)
    stolen: dict[int, list[Any]] = field(default_factory=dict)  # chunks done in-process

    def chunk(self, i: int) -> Sequence[Any]:
        return self.items[i * CHUNK:(i + 1) * CHUNK]


class WorkerPool:
    """Spawned worker processes, started on first need; ``close`` stops them."""

    def __init__(self, verifier: Verifier, anchors: Sequence[Anchor], processes: int) -> None:
        self.verifier = verifier
        self.anchors = list(anchors)
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: list[Job] = []  # submitted to the workers, results not taken yet

    def submit(self, task: str, items: Sequence[Any]) -> Job:
        """Start a job (in the workers when it pays off); ``results`` waits for it."""
        job = Job(task, items)
        if len(items) >= POOL_THRESHOLD and self.processes > 1:
            try:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(
                        self.processes, mp_context=get_context("spawn"),
                        initializer=init_worker, initargs=(self.anchors, os.getpid()),
                    )
                job.futures = [self._pool.submit(run_task, task, c)
                               for c in _chunks(items, CHUNK)]
                self._jobs.append(job)
            except (BrokenProcessPool, RuntimeError, OSError):
                self._failed()
        return job

    def results(self, job: Job, tick: Callable[[list[Any]], None] | None = None) -> list[Any]:
        """The job's results, in item order (tick is called with each chunk's results)."""
        out: list[Any] = []
        try:
            for i, future in enumerate(job.futures):
                while True:
                    chunk = job.stolen.pop(i, None)
                    if chunk is not None:
                        break
                    if future.done():
                        chunk = future.result()
                        break
                    if future.cancel():  # no worker took it yet: do it here
                        chunk = TASKS[job.task](self.verifier, job.chunk(i))
                        break
                    if not self._steal():
                        chunk = future.result()
                        break
                out.extend(chunk)
                if tick is not None:
                    tick(chunk)
        except (BrokenProcessPool, CancelledError):  # cancelled: by _failed, for another job
            self._failed()
            out = []
        finally:
            if job in self._jobs:
                self._jobs.remove(job)
        if len(out) != len(job.items):
            out = []
            for c in _chunks(job.items, CHUNK):
                chunk = TASKS[job.task](self.verifier, c)
                out.extend(chunk)
                if tick is not None:
                    tick(chunk)
        return out

    def _steal(self) -> bool:
        """While a worker finishes the chunk awaited, do the newest chunk no worker has
        taken yet in this process (the importer's otherwise idle time); False if none."""
        for job in reversed(self._jobs):
            for i in range(len(job.futures) - 1, -1, -1):
                if i not in job.stolen and job.futures[i].cancel():
                    job.stolen[i] = TASKS[job.task](self.verifier, job.chunk(i))
                    return True
        return False

    def _failed(self) -> None:
        # A worker died (out of memory, killed) or cannot start: carry on in this process.
        log.warn("worker processes failed; verifying in the importer process")
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        """Stop the worker processes, if any."""
        self._jobs.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

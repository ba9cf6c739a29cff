"""Batches of files into the store: verified by the workers, written in one transaction each.

Strategy: a batch of files is handed to the worker processes (``importer.pool``), which read
and classify each file by content and verify every object against the configured CAs; the
next batches are read and verified while the current one is written. Only then is the store
written, in one transaction per batch: CA updates, certificates (a few ``executemany``
statements for the whole batch), then CRLs in CRL-number order. A file is taken whole or not
at all: one object that fails (unparsable, not signed by a configured CA, a serial that
clashes with a stored certificate) rejects the file with a reason in plain words. Each
accepted file's SHA-256 is recorded in the same transaction, so a file seen again is
recognised and changes nothing; moving files away is the caller's job, after the commit
(``importer.spool``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.logger import Logger

from importer.formats import read_ca_certificate
from importer.parse import fast_cert_input
from importer.pool import FileLoad, Job, WorkerPool
from importer.progress import ImportSummary, Progress
from importer.settings import ImportSettings, SetupError
from importer.verify import Anchor, Verified, Verifier
from store.model import CaId, CrlInput, scope_label
from store.sqlbase import SqlStore

log = Logger()

AHEAD = 2  # batches read and verified ahead of the one being written
MAX_NOTES = 20  # notes of one batch logged (skipped URLs, URL conflicts, pending deltas)


@dataclass
class FileOutcome:
    """What became of one input file."""

    path: Path
    name: str
    outcome: str = "accepted"  # accepted | unchanged | rejected | skipped (could not read)
    reason: str = ""
    sha256: bytes = b""
    certs: int = 0
    crls: int = 0
    crl_cas: set[str] = field(default_factory=set)  # CAs whose current full CRL this file holds
    objects: list[Verified] = field(default_factory=list, repr=False)


@dataclass
class _Prepared:
    """A batch handed to the workers."""

    outcomes: list[FileOutcome]
    job: Job


_OUTCOME_WORDS = {
    "applied": "applied",
    "unchanged": "unchanged",
    "older": "older, changes nothing",
    "pending": "pending delta (its base CRL is not stored yet)",
    "refused": "refused",
}


def crl_outcome_text(ca: str, crl: CrlInput, outcome: str) -> str:
    """"<CA> <scope label> #<number>: <what apply_crl did>" for the summary and the log."""
    label = "full" if crl.idp_der is None else scope_label(
        tuple(crl.idp_urls), crl.only)
    if crl.is_delta:
        label += f" (delta over #{crl.base_number})"
    number = f"#{crl.number}" if crl.number is not None else f"of {crl.this_update:%Y-%m-%d %H:%M}"
    return f"{ca} {label} {number}: {_OUTCOME_WORDS.get(outcome, outcome)}"


def _keep_stored(stored_der: bytes | None, new_der: bytes) -> bool:
    """True when the stored CA certificate is a later re-issue of the same subject and key."""
    if stored_der is None or stored_der == new_der:
        return stored_der is not None
    old, new = x509.load_der_x509_certificate(stored_der), x509.load_der_x509_certificate(new_der)
    if old.subject != new.subject or old.public_key() != new.public_key():
        return False
    return bool(old.not_valid_before_utc > new.not_valid_before_utc)


class Importer:
    """Verifies and writes batches for one store; shared by ``import`` and the daemon."""

    def __init__(self, config: Any, store: SqlStore, now: Callable[[], datetime], *,
                 progress: Progress | None = None, workers: int | None = None) -> None:
        self.settings = ImportSettings.of(config)
        self.store = store
        self.now = now
        self.progress = progress
        self.workers = workers if workers is not None else self.settings.processes
        self.summary = ImportSummary()
        self.ca_ids: dict[str, CaId] = {}
        self._verifier: Verifier | None = None
        self._pool: WorkerPool | None = None
        self._started = time.monotonic()

    # --- set-up -------------------------------------------------------------------------

    def start(self) -> None:
        """Record every configured CA (the trust anchors) in the store."""
        ders: dict[str, bytes] = {}
        for i, ca in enumerate(self.settings.cas):
            try:
                ders[ca.name] = read_ca_certificate(ca.certificate)
                x509.load_der_x509_certificate(ders[ca.name]).public_key()
            except (OSError, ValueError) as exc:  # FileRejected is a ValueError
                raise SetupError(f"ca[{i}].certificate",
                                 f"{ca.certificate} is not a usable certificate: {exc}") from exc
        with self.store.batch(self.now()) as batch:
            for name, der in ders.items():
                stored = self.store.ca_by_name(name)
                if _keep_stored(None if stored is None else stored.cert_der, der):
                    assert stored is not None
                    self.ca_ids[name] = stored.id
                else:
                    self.ca_ids[name] = batch.ensure_ca(name, der)[0]
            anchors = [Anchor(n, self.ca_ids[n], d) for n, d in ders.items()]
            self._verifier = Verifier(anchors)
            self._pool = WorkerPool(self._verifier, anchors, self.workers)
            # A CA certificate issued by another configured CA is one of that CA's certificates.
            for name, der in ders.items():
                cert = x509.load_der_x509_certificate(der)
                issuer = self._verifier.issuer_of(cert)
                if issuer is not None and issuer.name != name:
                    batch.add_cert(fast_cert_input(cert, der, issuer.ca_id), f"config:{name}")
        self.summary.cas += batch.result.cas

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:
            raise RuntimeError("Importer.start() was not called")
        return self._verifier

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError("Importer.start() was not called")
        return self._pool

    def tick(self, files: int, certs: int) -> None:
        if self.progress is not None:
            self.progress.tick(files, certs)

    def _count_verified(self, chunk: list[Any]) -> None:
        if self.progress is None:
            return
        n = 0
        for item in chunk:
            if isinstance(item, FileLoad):
                objects = item.objects
            elif isinstance(item, Verified):
                objects = [item]
            else:  # (Verified | None, notes) of an index record
                objects = [] if item[0] is None else [item[0]]
            n += sum(1 for v in objects if v.kind != "crl")
        self.progress.tick(0, n)

    # --- verification -------------------------------------------------------------------

    def verify(self, groups: Sequence[Sequence[tuple[str, bytes]]]) -> list[list[Verified]]:
        """Verify every object of every group; the result mirrors the groups."""
        flat = [item for g in groups for item in g]
        results = self.pool.results(self.pool.submit("objects", flat), self._count_verified)
        out: list[list[Verified]] = []
        pos = 0
        for g in groups:
            out.append(results[pos:pos + len(g)])
            pos += len(g)
        return out

    # --- files --------------------------------------------------------------------------

    def import_files(self, files: Sequence[tuple[Path, str]]) -> list[FileOutcome]:
        """Import one batch of (path, name) files in one transaction; the caller moves them."""
        return self.complete(self.prepare(files))

    def import_batches(self, batches: Iterable[Sequence[tuple[Path, str]]]
                       ) -> Iterator[list[FileOutcome]]:
        """Batch after batch, reading and verifying the next ones while one is written."""
        pending: deque[_Prepared] = deque()
        for files in batches:
            pending.append(self.prepare(files))
            if len(pending) > AHEAD:
                yield self.complete(pending.popleft())
        while pending:
            yield self.complete(pending.popleft())

    def prepare(self, files: Sequence[tuple[Path, str]]) -> _Prepared:
        """Hand one batch to the workers (read, classify, verify; nothing is written)."""
        outcomes = [FileOutcome(path, name) for path, name in files]
        return _Prepared(outcomes, self.pool.submit("files", [str(o.path) for o in outcomes]))

    def complete(self, prepared: _Prepared) -> list[FileOutcome]:
        """Take a prepared batch's results and write it in one transaction."""
        loads: list[FileLoad] = self.pool.results(prepared.job, self._count_verified)
        outcomes = prepared.outcomes
        seen = self.store.files_seen(list({ld.sha256 for ld in loads if ld.state != "skipped"}))
        first: dict[bytes, FileOutcome] = {}
        work: list[FileOutcome] = []
        for o, load in zip(outcomes, loads, strict=True):
            if load.state == "skipped":
                o.outcome, o.reason = "skipped", load.reason
                continue
            o.sha256 = load.sha256
            if o.sha256 in first:
                continue  # a copy of a file earlier in this batch: decided with it
            first[o.sha256] = o
            if load.state == "large":
                o.outcome, o.reason = "rejected", load.reason
            elif o.sha256 in seen:
                o.outcome = "unchanged"
            elif load.state == "rejected":
                o.outcome, o.reason = "rejected", load.reason
            else:
                errors = [v.error for v in load.objects if v.error]
                if errors:
                    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
                    o.outcome, o.reason = "rejected", "; ".join(errors[:3]) + more
                else:
                    o.objects = load.objects
                    work.append(o)
        del loads
        if work:
            with self.store.batch(self.now()) as batch:
                self._apply(batch, work)
            result = batch.result
            self.summary.add(result)
            for note in result.notes[:MAX_NOTES]:
                log.info("import note: {note}", note=note)
            if len(result.notes) > MAX_NOTES:
                log.info("import notes: {more} more not shown", more=len(result.notes) - MAX_NOTES)
            log.info("batch files={files} accepted={accepted} generation={generation}"
                     " new={new} revoked={revoked} released={released} crls={crls}",
                     files=len(outcomes), accepted=sum(o.outcome == "accepted" for o in work),
                     generation=result.generation or int(self.store.generation()),
                     new=result.certs_new, revoked=result.revoked, released=result.released,
                     crls=result.crls)
        for o in outcomes:
            if o.outcome != "skipped" and o.sha256 in first and first[o.sha256] is not o:
                src = first[o.sha256]
                o.outcome = "unchanged" if src.outcome == "accepted" else src.outcome
                o.reason = src.reason
            o.objects = []
            self._count(o)
        self.tick(len(outcomes), 0)
        return outcomes

    def _count(self, o: FileOutcome) -> None:
        if o.outcome == "skipped":
            log.warn("file {name} skipped: {reason}", name=o.name, reason=o.reason)
            return
        self.summary.files += 1
        if o.outcome == "rejected":
            self.summary.rejected.append((o.name, o.reason))
            log.warn("file {name} rejected: {reason}", name=o.name, reason=o.reason)
            return
        if o.outcome == "accepted":
            self.summary.accepted += 1
        else:
            self.summary.unchanged += 1
        log.info("file {name} outcome={outcome} certs={certs} crls={crls}",
                 name=o.name, outcome=o.outcome, certs=o.certs, crls=o.crls)

    def _reject_clashes(self, batch: Any, files: list[FileOutcome]) -> list[FileOutcome]:
        """Files whose certificates reuse no serial of another certificate; others rejected."""
        wanted: dict[int, set[int]] = {}
        for o in files:
            for v in o.objects:
                if v.cert is not None:
                    wanted.setdefault(v.cert.ca_id, set()).add(v.cert.serial)
        claimed: dict[tuple[int, int], bytes] = {}
        for ca_id, serials in wanted.items():
            rows = batch.known_certs(ca_id, sorted(serials))
            for serial in serials:
                row = rows.get(serial)
                if row is not None and row[1] is not None:
                    claimed[(ca_id, serial)] = row[1]
        kept = []
        for o in files:
            why = []
            mine: list[tuple[tuple[int, int], bytes]] = []
            for v in o.objects:
                if v.cert is None:
                    continue
                key = (v.cert.ca_id, v.cert.serial)
                sha = v.cert.sha256
                known = claimed.get(key)
                if known is not None and known != sha:
                    why.append(f"certificate serial 0x{v.cert.serial:X} differs from the"
                               f" certificate {self._ca_name(v.cert.ca_id)} already issued with"
                               f" that serial")
                mine.append((key, sha))
            if why:
                # Not recorded as imported: once the clash is resolved it can be dropped again.
                o.outcome, o.reason = "rejected", "; ".join(why[:3])
                continue
            claimed.update(mine)
            kept.append(o)
        return kept

    def _apply(self, batch: Any, files: list[FileOutcome]) -> None:
        """Write verified objects: CA updates, certificates, then CRLs in number order."""
        files = self._reject_clashes(batch, files)
        for o in files:
            for v in o.objects:
                if v.kind == "ca" and v.ca_name is not None and v.ca_der is not None:
                    stored = self.store.ca_by_name(v.ca_name)
                    if not _keep_stored(None if stored is None else stored.cert_der, v.ca_der):
                        batch.ensure_ca(v.ca_name, v.ca_der)
        items = []
        for o in files:
            for v in o.objects:
                if v.cert is not None:
                    o.certs += 1
                    items.append((v.cert, o.name))
        if items:
            batch.add_cert_rows(items)
        crls = [(v.crl, o) for o in files for v in o.objects if v.crl is not None]
        crls.sort(key=lambda c: (c[0].ca_id, c[0].is_delta,
                                 -1 if c[0].number is None else c[0].number,
                                 c[0].this_update))
        for crl, o in crls:
            o.crls += 1
            outcome = batch.apply_crl(crl, o.name)
            if outcome in ("applied", "unchanged") and not crl.is_delta and crl.idp_der is None:
                o.crl_cas.add(self._ca_name(crl.ca_id))  # the full scope: every revocation
            what = crl_outcome_text(self._ca_name(crl.ca_id), crl, outcome)
            self.summary.crl_outcomes.append(what)
            log.info("file {name}: CRL {what}", name=o.name, what=what)
        batch.record_files([(o.sha256, o.name, "accepted") for o in files])

    def _ca_name(self, ca_id: int) -> str:
        return next((n for n, i in self.ca_ids.items() if i == ca_id), f"CA {ca_id}")

    def mark_synced(self, names: Iterable[str] | None = None) -> None:
        """Record that the statuses of these CAs (default all) are confirmed as of now."""
        ids = [self.ca_ids[n] for n in (self.ca_ids if names is None else names)]
        if ids:
            with self.store.batch(self.now()) as batch:
                for ca_id in ids:
                    batch.mark_synced(ca_id)

    def finish(self) -> ImportSummary:
        """The summary, with the final generation and elapsed time."""
        if self.progress is not None:
            self.progress.finish()
        self.summary.generation = int(self.store.generation())
        self.summary.elapsed = time.monotonic() - self._started
        return self.summary

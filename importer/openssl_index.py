"""OpenSSL CA databases: ``index.txt`` parsed exactly as OpenSSL's TXT_DB reads it.

Strategy: one line is one record of six tab-separated fields (status, expiry, revocation,
serial, filename, subject); a backslash before a tab makes the tab literal, a line starting
with ``#`` is a comment, and a line without its final newline is still being written, so it
is left for the next read (OpenSSL itself waits for the newline). A malformed line is reported
with its line number and skipped; the other lines still count. ``IndexTracker`` notices when
the file changed (mtime, size, inode, then SHA-256 of the content) and hands out only the
lines not applied yet.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.logger import Logger

from importer.batch import AHEAD
from store.model import IndexLine, RevocationReason, Serial
from store.writer import CertRow

if TYPE_CHECKING:
    from importer.batch import Importer
    from importer.pool import Job
    from importer.settings import OpensslDatabase

log = Logger()

# The names `openssl ca` writes (apps/ca.c crl_reasons[]), compared case-insensitively as
# OpenSSL's unpack_revinfo does; the last three are its pseudo-reasons with an argument.
OPENSSL_REASONS: dict[str, RevocationReason] = {
    "unspecified": RevocationReason.UNSPECIFIED,
    "keycompromise": RevocationReason.KEY_COMPROMISE,
    "cacompromise": RevocationReason.CA_COMPROMISE,
    "affiliationchanged": RevocationReason.AFFILIATION_CHANGED,
    "superseded": RevocationReason.SUPERSEDED,
    "cessationofoperation": RevocationReason.CESSATION_OF_OPERATION,
    "certificatehold": RevocationReason.CERTIFICATE_HOLD,
    "removefromcrl": RevocationReason.REMOVE_FROM_CRL,
    # Not written by OpenSSL, but RFC 5280 reasons other tools may put there.
    "privilegewithdrawn": RevocationReason.PRIVILEGE_WITHDRAWN,
    "aacompromise": RevocationReason.AA_COMPROMISE,
}
_PSEUDO_REASONS: dict[str, RevocationReason] = {
    "holdinstruction": RevocationReason.CERTIFICATE_HOLD,  # ",holdInstruction,<OID>"
    "keytime": RevocationReason.KEY_COMPROMISE,  # ",keyTime,<compromise time>"
    "cakeytime": RevocationReason.CA_COMPROMISE,  # ",CAkeyTime,<compromise time>"
}
_UTC_TIME = re.compile(r"^\d{12}Z$")
_GENERALIZED_TIME = re.compile(r"^\d{14}Z$")
_SERIAL = re.compile(r"^[0-9A-Fa-f]+$")
_OID = re.compile(r"^\d+(\.\d+)+$")
FIELDS = 6


class IndexSyntaxError(ValueError):
    """One line of index.txt that OpenSSL would not accept either."""


@dataclass(frozen=True)
class ParsedLine:
    """A well-formed record with its 1-based line number and raw text."""

    number: int
    raw: str
    line: IndexLine
    serial_text: str  # the serial field as written (OpenSSL names the certificate file by it)


@dataclass(frozen=True)
class IndexContent:
    """Everything one read of index.txt yielded."""

    lines: tuple[ParsedLine, ...]
    errors: tuple[tuple[int, str], ...]  # (line number, what is wrong)
    incomplete_tail: bool  # the last line had no newline yet


_TIMES: dict[str, datetime] = {}  # a CA's expiry and revocation times repeat


def parse_time(text: str) -> datetime:
    """``_parse_time``, remembered (datetimes are immutable)."""
    when = _TIMES.get(text)
    if when is None:
        when = _parse_time(text)
        if len(_TIMES) >= 65536:
            _TIMES.clear()
        _TIMES[text] = when
    return when


def _parse_time(text: str) -> datetime:
    """UTCTime YYMMDDHHMMSSZ (RFC 5280 §4.1.2.5.1 century rule) or GeneralizedTime."""
    if _UTC_TIME.match(text):
        yy = int(text[:2])
        full = ("19" if yy >= 50 else "20") + text
    elif _GENERALIZED_TIME.match(text):
        full = text
    else:
        raise IndexSyntaxError(f"time {text!r} is neither YYMMDDHHMMSSZ nor YYYYMMDDHHMMSSZ")
    try:  # fixed positions (the patterns above): what strptime("%Y%m%d%H%M%SZ") reads, faster
        return datetime(int(full[:4]), int(full[4:6]), int(full[6:8]), int(full[8:10]),
                        int(full[10:12]), int(full[12:14]), tzinfo=UTC)
    except ValueError as exc:
        raise IndexSyntaxError(f"time {text!r} is not a valid date") from exc


def parse_revocation(text: str) -> tuple[datetime, RevocationReason | None]:
    """``date[,reason[,argument]]`` as OpenSSL's make_revocation_str writes it."""
    parts = text.split(",", 2)
    when = parse_time(parts[0])
    if len(parts) == 1:
        return when, None  # `openssl ca -revoke` without -crl_reason: no reason code
    name = parts[1].lower()
    arg = parts[2] if len(parts) == 3 else None
    if name in _PSEUDO_REASONS:
        if arg is None:
            raise IndexSyntaxError(f"revocation reason {parts[1]} needs an argument")
        if name == "holdinstruction":
            if not _OID.match(arg):
                raise IndexSyntaxError(f"hold instruction {arg!r} is not an OID")
        else:
            parse_time(arg)  # the compromise time must at least be a time
        return when, _PSEUDO_REASONS[name]
    reason = OPENSSL_REASONS.get(name)
    if reason is None:
        raise IndexSyntaxError(f"unknown revocation reason {parts[1]!r}")
    if reason is RevocationReason.UNSPECIFIED:
        return when, None  # RFC 5280 §5.3.1: unspecified is not put into a CRL either
    return when, reason


def split_fields(text: str) -> list[str]:
    """Split on tabs not preceded by a backslash; the backslash of an escaped tab is dropped."""
    if "\\" not in text:
        return text.split("\t")
    fields: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in text:
        if ch == "\t":
            if esc:
                cur[-1] = "\t"
            else:
                fields.append("".join(cur))
                cur = []
                esc = False
                continue
        else:
            cur.append(ch)
        esc = ch == "\\"
    fields.append("".join(cur))
    return fields


def parse_line(text: str) -> tuple[IndexLine, str]:
    """One record (without its newline) into an IndexLine and the serial field as written."""
    fields = split_fields(text)
    if len(fields) != FIELDS:
        raise IndexSyntaxError(f"expected {FIELDS} tab-separated fields, found {len(fields)}")
    status, expires, revocation, serial, filename, subject = fields
    if status not in ("V", "R", "E"):
        raise IndexSyntaxError(f"status {status!r} is not V, R or E")
    if not _SERIAL.match(serial):
        raise IndexSyntaxError(f"serial {serial!r} is not hexadecimal")
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None
    if status == "R":
        if not revocation:
            raise IndexSyntaxError("status R without a revocation date")
        revoked_at, reason = parse_revocation(revocation)
    elif revocation:
        raise IndexSyntaxError(f"status {status} with a revocation field {revocation!r}")
    line = IndexLine(status=status, expires=parse_time(expires), revoked_at=revoked_at,
                     reason=reason, serial=Serial(int(serial, 16)), filename=filename,
                     subject=subject)
    return line, serial


def parse_index(data: bytes) -> IndexContent:
    """All records of an index.txt; bad lines become (line number, reason) errors."""
    # OpenSSL does not decode the file; undecodable bytes only matter in the subject field.
    text = data.decode("utf-8", errors="replace")
    chunks = text.split("\n")
    tail = chunks.pop()  # "" when the file ends with a newline
    lines: list[ParsedLine] = []
    errors: list[tuple[int, str]] = []
    for number, raw in enumerate(chunks, start=1):
        if raw.startswith("#"):
            continue
        record = raw.removesuffix("\r")
        try:
            parsed, serial_text = parse_line(record)
        except IndexSyntaxError as exc:
            errors.append((number, str(exc)))
            continue
        lines.append(ParsedLine(number, raw, parsed, serial_text))
    return IndexContent(tuple(lines), tuple(errors), bool(tail))


def certificate_files(certs_dir: Path, index_dir: Path, parsed: ParsedLine) -> Iterator[Path]:
    """Where `openssl ca` put the certificate of a record: <certs_dir>/<SERIAL>.pem first."""
    for name in certificate_file_names(str(certs_dir), str(index_dir), parsed):
        yield Path(name)


def certificate_file_names(certs_dir: str, index_dir: str, parsed: ParsedLine) -> list[str]:
    """``certificate_files`` as strings (a million ``Path`` objects cost seconds)."""
    written = parsed.serial_text
    canonical = format(parsed.line.serial, "X")
    if len(canonical) % 2:
        canonical = "0" + canonical  # BN_bn2hex: two digits per octet, "00" for zero
    base = certs_dir if certs_dir.endswith("/") else certs_dir + "/"
    out = [f"{base}{written}.pem"]
    if canonical != written:
        out.append(f"{base}{canonical}.pem")
    upper = written.upper()
    if upper != written and upper != canonical:
        out.append(f"{base}{upper}.pem")
    fn = parsed.line.filename
    if fn and fn != "unknown":
        if os.path.isabs(fn):
            out.append(fn)
        else:
            out.append(os.path.join(certs_dir, fn))
            out.append(os.path.join(index_dir, fn))
    return out


@dataclass
class IndexTracker:
    """Change detection for one index.txt and the set of lines already applied."""

    path: Path
    signature: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) last applied
    sha256: bytes | None = None
    applied: set[str] = field(default_factory=set)
    missing: dict[int, ParsedLine] = field(default_factory=dict)  # serial -> line, no cert file
    reported: set[tuple[int, str]] = field(default_factory=set)  # malformed lines logged

    def stat(self) -> tuple[int, int, int] | None:
        """The file's signature now, or None when it does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> bool:
        """Cheap check (one stat): does the file need reading?"""
        sig = self.stat()
        return sig is not None and sig != self.signature

    def read(self) -> tuple[tuple[int, int, int], bytes, bytes] | None:
        """(signature, content, sha256), or None when the file is gone."""
        sig = self.stat()
        if sig is None:
            return None
        data = self.path.read_bytes()
        return sig, data, hashlib.sha256(data).digest()

    def pending(self, content: IndexContent) -> list[ParsedLine]:
        """Records not applied by an earlier read (a changed line counts as new)."""
        return [p for p in content.lines if p.raw not in self.applied]

    def mark(self, signature: tuple[int, int, int], sha256: bytes, content: IndexContent) -> None:
        """Remember a read as fully applied."""
        self.signature = signature
        self.sha256 = sha256
        self.applied = {p.raw for p in content.lines}


# --- applying an index to the store -------------------------------------------------------

def sync_database(importer: Importer, db: OpensslDatabase, tracker: IndexTracker, *,
                  retry_missing: bool = False) -> bool:
    """Apply what changed in one index.txt; True when the index was (re)read."""
    if not tracker.changed():
        if retry_missing and tracker.missing:
            _apply_all(importer, db, tracker, list(tracker.missing.values()), status=False)
        return False
    read = tracker.read()
    if read is None:
        log.warn("index {index} does not exist", index=str(db.index))
        return False
    signature, data, sha = read
    if sha == tracker.sha256:
        tracker.signature = signature  # touched, not changed
        return False
    content = parse_index(data)
    del data
    for number, why in content.errors:
        if (number, why) not in tracker.reported:
            log.warn("index {index} line {line} is malformed and skipped (the other lines are"
                     " applied): {why}", index=str(db.index), line=number, why=why)
    tracker.reported = set(content.errors)
    importer.summary.malformed_lines += len(content.errors)
    if tracker.sha256 is None and importer.store.file_seen(sha):
        # Applied before a restart: only certificate files still missing are of interest.
        _apply_all(importer, db, tracker, list(content.lines), status=False)
    else:
        _apply_all(importer, db, tracker, tracker.pending(content), status=True, sha=sha)
    tracker.mark(signature, sha, content)
    return True


@dataclass
class _Chunk:
    lines: list[ParsedLine]
    owners: list[ParsedLine]  # the records whose certificate files are being read
    job: Job | None
    sha: bytes | None


def _apply_all(importer: Importer, db: OpensslDatabase, tracker: IndexTracker,
               lines: list[ParsedLine], *, status: bool, sha: bytes | None = None) -> None:
    """Apply records chunk by chunk, the workers reading the next chunks' certificate files
    while one chunk is written; the index's SHA-256 is recorded with the last chunk."""
    size = importer.settings.batch_size  # records per transaction
    chunks = [lines[i:i + size] for i in range(0, len(lines), size)] or [[]]
    pending: deque[_Chunk] = deque()
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        pending.append(_start(importer, db, tracker, chunk, sha if last and status else None))
        if len(pending) > AHEAD:
            _finish(importer, db, tracker, pending.popleft(), status=status)
    while pending:
        _finish(importer, db, tracker, pending.popleft(), status=status)


def _start(importer: Importer, db: OpensslDatabase, tracker: IndexTracker,
           lines: list[ParsedLine], sha: bytes | None) -> _Chunk:
    """Hand the certificate files of the records not stored yet to the workers."""
    ca_id = importer.ca_ids[db.ca]
    stored = importer.store.serials_with_certificate(ca_id, [p.line.serial for p in lines])
    owners = []
    for p in lines:
        if p.line.serial in stored:
            tracker.missing.pop(p.line.serial, None)
        else:
            owners.append(p)
    certs_dir, index_dir = str(db.certs_dir), str(db.index.parent)
    items = [certificate_file_names(certs_dir, index_dir, p) for p in owners]
    job = importer.pool.submit("index", items) if items else None
    return _Chunk(lines, owners, job, sha)


def _finish(importer: Importer, db: OpensslDatabase, tracker: IndexTracker, chunk: _Chunk, *,
            status: bool) -> None:
    """Certificates first, then the status of each record, in one transaction."""
    store = importer.store
    ca_id = importer.ca_ids[db.ca]
    found = [] if chunk.job is None else importer.pool.results(chunk.job,
                                                               importer._count_verified)
    certs: list[tuple[CertRow, str]] = []
    source = f"index:{db.index}"
    for p, (v, notes) in zip(chunk.owners, found, strict=True):
        for path in notes:
            log.warn("{path} is not a certificate file", path=path)
        if v is None:
            tracker.missing[p.line.serial] = p
            continue
        tracker.missing.pop(p.line.serial, None)
        if v.cert is None or v.cert.ca_id != ca_id or v.cert.serial != p.line.serial:
            why = v.error or f"the file does not hold serial 0x{p.line.serial:X} of {db.ca}"
            log.warn("index {index} line {line}: certificate not imported: {why}",
                     index=str(db.index), line=p.number, why=why)
            continue
        certs.append((v.cert, source))
    lines = chunk.lines
    if not certs and not (status and lines) and chunk.sha is None:
        return
    with store.batch(importer.now()) as batch:
        if certs:
            batch.add_cert_rows(certs)
        if status and lines:
            batch.apply_index_lines(ca_id, [p.line for p in lines], source)
        if chunk.sha is not None:
            batch.record_file(chunk.sha, source, "index")
    importer.summary.add(batch.result)
    if status:
        importer.summary.index_lines += len(lines)
    importer.tick(len(lines), 0)  # certificates were counted while being verified
    log.info("index {index} lines={lines} certs={certs} generation={generation}",
             index=str(db.index), lines=len(lines) if status else 0, certs=len(certs),
             generation=batch.result.generation or int(store.generation()))

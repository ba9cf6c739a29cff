"""What the responder says about each CertID: store-backed, clock-injected, pure.

Strategy: ``answer(request, store, now, policy)`` maps every CertID to its issuer by the
CertID's own hash algorithm (one indexed store read per issuer), then to a status (one
indexed read per serial), and returns a typed ``OcspAnswer``; signing and encoding happen
elsewhere. Errors leave as ``OcspError`` subclasses carrying their wire status.

Which issuer answers (RFC 6960 §2.2, §4.2.2.2). A response carries one signature, and a
delegated signer is authoritative for its own CA only, so one response speaks for one CA:
the issuer of the first CertID that names a CA this server serves (found in the store *and*
configured with an OCSP signer). Every CertID of that issuer gets its real status; every
other CertID of the same request (an issuer not served, or served by another signer) gets
``unknown`` — RFC 6960's meaning of unknown is "the responder doesn't know about the
certificate being requested, usually because the request indicates an unrecognized issuer".
Only when *no* CertID names a served issuer is the answer ``unauthorized``. A client that
needs several issuers answered sends one request per issuer.

Times. ``thisUpdate`` is when the store last confirmed the CA's statuses (``synced_at``, the
import daemon refreshes it every 30 s), but never later than ``now - CLOCK_MARGIN``: clients
whose clock is a little behind ours (pyhanko-certvalidator rejects a thisUpdate later than
its own clock) still accept it. A CA never confirmed by the daemon (a store filled by
one-shot imports, ``synced_at`` absent) is taken as current: ``now - CLOCK_MARGIN``.
``nextUpdate = thisUpdate + validity``. When the daemon stopped confirming for so long that
nextUpdate is already past, the responder does not sign a response that is stale on arrival:
it answers ``tryLater`` (the health check reports the stale import long before).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509

from server.ocsp.codec import (
    EXTENDED_REVOKE_TIME,
    CertId,
    OcspRequest,
    SingleAnswer,
    TryLater,
    Unauthorized,
)
from server.ocsp.signer import Signer
from store.model import HASH_ALGORITHMS, CaId, CaRecord, CertRecord, CertStatus, RevocationReason
from store.errors import StoreError

CLOCK_MARGIN = timedelta(seconds=60)


class StatusStore(Protocol):
    def ca_by_issuer_hash(self, algorithm: str, name_hash: bytes,
                          key_hash: bytes) -> CaRecord | None: ...
    def cert(self, ca_id: int, serial: int) -> CertRecord | None: ...


@dataclass(frozen=True)
class CaPolicy:
    """How one served CA answers: its signer and its configured profile."""

    signer: Signer
    validity: timedelta
    unknown_serials: str = "unknown"  # "unknown" | "revoked" (RFC 6960 §2.2 extended revoke)
    archive_cutoff: bool = True
    ca_not_before: datetime = field(init=False)

    def __post_init__(self) -> None:
        cert = x509.load_der_x509_certificate(self.signer.ca_certificate_der)
        object.__setattr__(self, "ca_not_before", cert.not_valid_before_utc)


@dataclass(frozen=True)
class Policy:
    """Every served CA's policy, by CA name (the configured name, as the store keeps it)."""

    cas: Mapping[str, CaPolicy]

    def for_ca(self, ca: CaRecord) -> CaPolicy | None:
        """The policy of a store CA, if it is served with the certificate the signer checked."""
        found = self.cas.get(ca.name)
        if found is None or found.signer.ca_certificate_der != ca.cert_der:
            return None
        return found


@dataclass(frozen=True)
class OcspAnswer:
    """What to sign: the responding CA, one SingleAnswer per CertID, and the extensions."""

    ca: CaRecord
    policy: CaPolicy
    singles: tuple[SingleAnswer, ...]
    produced_at: datetime
    this_update: datetime
    next_update: datetime
    nonce: bytes | None
    extended_revoke: bool
    serials: frozenset[tuple[CaId, int]]  # the certificates whose change voids this answer


def status_times(synced_at: datetime | None, now: datetime,
                 validity: timedelta) -> tuple[datetime, datetime]:
    """(thisUpdate, nextUpdate) for a CA last confirmed at synced_at (see module doc)."""
    latest = now - CLOCK_MARGIN
    known = latest if synced_at is None else min(synced_at, latest)
    this_update = known.replace(microsecond=0)
    next_update = this_update + validity
    if next_update <= now:
        raise TryLater(f"statuses last confirmed at {this_update.isoformat()}: older than the"
                       f" validity of {validity}")
    return this_update, next_update


def _status(row: CertRecord | None, policy: CaPolicy) -> tuple[str, datetime | None,
                                                                str | None, bool]:
    """(status, revocation time, reason, extended revoke) of one serial."""
    if row is None:
        if policy.unknown_serials == "revoked":
            return "revoked", EXTENDED_REVOKE_TIME, RevocationReason.CERTIFICATE_HOLD.value, True
        return "unknown", None, None, False
    if row.status is CertStatus.REVOKED:
        reason = row.reason
        # RFC 5280 §5.3.1: unspecified is better expressed by leaving the reason out.
        name = None if reason is None or reason is RevocationReason.UNSPECIFIED else reason.value
        return "revoked", row.revoked_at or row.imported_at, name, False
    return "good", None, None, False  # expired certificates keep their real status


def answer(request: OcspRequest, store: StatusStore, now: datetime,
           policy: Policy) -> OcspAnswer:
    """Statuses for every CertID of request (RFC 6960 §2.2); raise Unauthorized/TryLater."""
    try:
        return _answer(request, store, now, policy)
    except StoreError as exc:
        raise TryLater(str(exc)) from exc


def _answer(request: OcspRequest, store: StatusStore, now: datetime,
            policy: Policy) -> OcspAnswer:
    issuers: dict[tuple[str, bytes, bytes], CaRecord | None] = {}

    def issuer_of(cid: CertId) -> CaRecord | None:
        if cid.hash_algorithm not in HASH_ALGORITHMS:
            return None
        k = (cid.hash_algorithm, cid.issuer_name_hash, cid.issuer_key_hash)
        if k not in issuers:
            issuers[k] = store.ca_by_issuer_hash(*k)
        return issuers[k]

    cas = [issuer_of(cid) for cid in request.cert_ids]
    responding: CaRecord | None = None
    ca_policy: CaPolicy | None = None
    for ca in cas:
        if ca is not None and (found := policy.for_ca(ca)) is not None:
            responding, ca_policy = ca, found
            break
    if responding is None or ca_policy is None:
        raise Unauthorized("no CertID names an issuer this responder serves")
    this_update, next_update = status_times(responding.synced_at, now, ca_policy.validity)
    cutoff = ca_policy.ca_not_before if ca_policy.archive_cutoff else None
    singles = []
    serials = set()
    extended = False
    for cid, ca in zip(request.cert_ids, cas, strict=True):
        if ca is None or ca.id != responding.id:
            singles.append(SingleAnswer(cid, "unknown", this_update, next_update,
                                        archive_cutoff=cutoff))
            continue
        row = store.cert(ca.id, cid.serial)
        status, revoked_at, reason, ext = _status(row, ca_policy)
        extended = extended or ext
        serials.add((ca.id, cid.serial))
        singles.append(SingleAnswer(cid, status, this_update, next_update,  # type: ignore[arg-type]
                                    revoked_at=revoked_at, reason=reason, archive_cutoff=cutoff))
    return OcspAnswer(
        ca=responding, policy=ca_policy, singles=tuple(singles), produced_at=now,
        this_update=this_update, next_update=next_update, nonce=request.nonce,
        # RFC 6960 §4.4.8: the extension says "this responder uses the extended definition";
        # a CA in that mode sends it on every response, not only on those that needed it.
        extended_revoke=extended or ca_policy.unknown_serials == "revoked",
        serials=frozenset(serials),
    )

"""The OCSP service: request bytes in, response bytes (and what to log) out.

Strategy: the one object the HTTP adapter talks to and the composition root reloads. It owns
the signers (checked at construction: a bad one raises ``SignerError`` and nothing starts),
the per-CA policy and the cache of pre-signed responses, which the change feed voids. A
request without a nonce is first looked up by its raw bytes (no ASN.1 parsing at all), then
by its CertIDs; only a miss reaches the store and the signer. Errors become unsigned
responses; a bug becomes ``internalError`` with its traceback in the log.

With a threaded ``StoreAccess`` (``access``), ``miss`` answers a miss in a store thread (store
reads and signing) and returns a Deferred; hits never leave the reactor thread. A miss is
inserted into the cache only if no change-feed invalidation came since its first store read
(``ResponseCache.put(epoch=)``), and a full pool answers ``tryLater`` at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from server.ocsp.cache import CachedResponse, ResponseCache, certids_key, raw_key
from server.ocsp.codec import (
    EXTENDED_REVOKE_TIME,
    OcspError,
    OcspRequest,
    encode_error,
    encode_response_der,
    encode_responses_der,
    plain_request_der,
    produced_at_der,
    responder_id_der,
    response_data_der,
)
from server.ocsp.der import parse_request
from server.ocsp.requestor import RequestorCheck
from server.ocsp.responder import CaPolicy, OcspAnswer, Policy, StatusStore, answer
from server.ocsp.signer import Signer, expiry_warning, load_signers
from store.model import Change
from store.errors import StoreError

log = Logger()

# Requests larger than this are answered but not cached: the cache is bounded in entries,
# so its memory must be bounded per entry too (common clients ask for one certificate).
REFRESH_EVERY = 30.0  # seconds between looks for cached responses due for re-signing
REFRESH_AHEAD = timedelta(seconds=2 * REFRESH_EVERY)
REFRESH_BATCH = 5000  # responses re-signed per look at most
CACHEABLE_CERTIDS = 8
CACHEABLE_REQUEST_BYTES = 2048


@dataclass(frozen=True)
class Outcome:
    """One OCSP exchange, as the HTTP adapter sends and logs it."""

    der: bytes
    status: str  # "successful" or the error status
    cache: str  # "hit" | "miss" | "nonce" (never cached) | "-" (error)
    ca: str | None = None
    serials: tuple[int, ...] = ()
    statuses: tuple[str, ...] = ()
    nonce: bool = False
    etag: str | None = None
    this_update: datetime | None = None
    next_update: datetime | None = None
    reason: str | None = None  # why an error, for the log
    backoff: float = 0.0  # shed: seconds before the connection's next request is read


@dataclass(frozen=True)
class Signed:
    """A response computed for a cache miss, with what ``OcspService.settle`` keeps of it."""

    outcome: Outcome
    entry: CachedResponse | None = None  # to cache under keys (None: nothing to keep)
    keys: tuple[bytes, ...] = ()
    unknown: bool = False  # every CertID names a serial the store does not know


def never_issued(result: OcspAnswer) -> bool:
    """Whether every status of an answer is about a serial the CA never issued: ``unknown``,
    or the RFC 6960 §2.2 extended "revoked, certificateHold, 1970-01-01"."""
    return all(s.status == "unknown" or (s.status == "revoked" and result.extended_revoke
                                         and s.revoked_at == EXTENDED_REVOKE_TIME)
               for s in result.singles)


@dataclass(frozen=True)
class PublishedCa:
    """A configured CA as the publication pages show it."""

    name: str
    der: bytes
    subject: str
    sha256: str
    not_after: datetime


def nonce_signing(entry: CachedResponse, nonce: bytes, now: datetime) -> tuple[Any, ...]:
    """The arguments of ``OcspService.sign_nonce`` for a nonce request answered at now from
    the parts of entry (also what goes to a signing process)."""
    return (entry.ca_name, int(now.timestamp()), entry.responses, nonce, entry.extended_revoke)


def _produced_at_der(at: datetime) -> bytes:
    return produced_at_der(int(at.timestamp()))


def etag_of(der: bytes) -> str:
    return '"' + hashlib.sha256(der).hexdigest()[:32] + '"'


def build_policy(config: Any, signers: dict[str, Signer]) -> Policy:
    """The responder policy of every CA that has a signer."""
    cas = {}
    for ca in config.cas:
        signer = signers.get(ca.name)
        if signer is None or ca.ocsp is None:
            continue
        cas[ca.name] = CaPolicy(signer=signer, validity=timedelta(seconds=ca.ocsp.validity),
                                unknown_serials=ca.ocsp.unknown_serials,
                                archive_cutoff=ca.ocsp.archive_cutoff)
    return Policy(cas)


def _published(config: Any) -> dict[str, PublishedCa]:
    out = {}
    for ca in config.cas:
        data = ca.certificate.read_bytes()
        cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data))
        der = cert.public_bytes(serialization.Encoding.DER)
        out[ca.name] = PublishedCa(ca.name, der, cert.subject.rfc4514_string(),
                                   hashlib.sha256(der).hexdigest(), cert.not_valid_after_utc)
    return out


class OcspService:
    """Signers, policy and response cache of one server process."""

    def __init__(self, config: Any, store: StatusStore, now: Callable[[], datetime], *,
                 signers: dict[str, Signer] | None = None, access: Any = None) -> None:
        self.access = access if access is not None and not access.inline else None
        self.store = access.store if self.access is not None else store
        self.now = now
        self.max_certids = config.http.max_certids
        self.cache = ResponseCache(config.http.cache_entries)
        # signed answers about never-issued serials, apart so they cannot evict real ones;
        # invalidated and cleared together with the cache, so that its epoch moves with the
        # cache's and ``settle`` checks either against the one read before the store reads
        self.unknown = ResponseCache(getattr(config.http, "unknown_cache_entries", 10_000))
        self.signing: Any = None  # server.ocsp.signing.SigningQueue, set by the HTTP factory
        self.presigned = 0  # responses signed ahead of any request for them
        self.presign_backlog = 0  # requests queued for pre-signing, not signed yet (metrics)
        self._backlog_lock = threading.Lock()  # pre-signing runs in the store threads too
        self._install(config, signers if signers is not None else load_signers(config, now()))

    def _install(self, config: Any, signers: dict[str, Signer]) -> None:
        self.config = config
        self.signers = signers
        self.policy = build_policy(config, signers)
        self.published = _published(config)
        self.max_certids = config.http.max_certids
        self.requestors = RequestorCheck(config.http.request_signatures,
                                         {n: ca.der for n, ca in self.published.items()})

    # --- composition root ----------------------------------------------------------------

    def reload(self, config: Any) -> None:
        """Re-read keys and certificates; a bad signer raises and keeps the running ones."""
        signers = load_signers(config, self.now())
        self._install(config, signers)
        self.cache.clear()
        self.unknown.clear()
        if self.signing is not None:
            self.signing.reload(config)
        self.warn_expiring()

    def on_changes(self, changes: Sequence[Change]) -> None:
        """Change-feed subscriber: void the cached responses a batch touched, and re-sign
        at once those of certificates whose status changed (not waiting for a request)."""
        voided: list[CachedResponse] = []
        self.unknown.invalidate(changes)  # a serial issued now is no longer unknown
        dropped = self.cache.invalidate(changes, voided)
        if dropped:
            log.debug("ocsp cache: {dropped} responses voided", dropped=dropped)
        if voided:
            self.presign(voided)

    def refresh_due(self) -> Any:
        """Re-sign, ahead of time, cached responses whose refresh time comes within
        ``REFRESH_AHEAD`` (run every ``REFRESH_EVERY`` by the HTTP factory): a response in
        use is replaced before it is dropped, so it is never re-signed on a request."""
        due = self.cache.due(self.now() + REFRESH_AHEAD, REFRESH_BATCH)
        return self.presign(due) if due else None

    def presign(self, entries: Sequence[CachedResponse]) -> Any:
        """Sign anew the responses to the requests behind entries, and cache them: in the
        store threads when threaded, else cooperatively on the reactor (a slice at a time,
        so that requests keep being answered). Returns a Deferred fired when done."""
        requests = list(dict.fromkeys(e.request for e in entries if e.request))
        if not requests:
            return None
        self._queued(len(requests))
        if self.access is not None:
            d = self.access.run(self._presign_all, requests)
            return d.addErrback(lambda f: log.failure("OCSP pre-signing failed", f))
        from twisted.internet import task

        return task.cooperate(self._presign_each(requests)).whenDone()

    def _presign_all(self, requests: Sequence[bytes]) -> int:
        return sum(1 for _ in self._presign_each(requests))

    def _queued(self, delta: int) -> None:
        with self._backlog_lock:
            self.presign_backlog += delta

    def _presign_each(self, requests: Sequence[bytes]) -> Any:
        left = len(requests)  # leaves the backlog however this ends (done, postponed, stopped)
        try:
            for der in requests:
                try:
                    request = parse_request(der, self.max_certids)
                    self._respond(der, request, self.now(), fresh=True)
                    self.presigned += 1
                except OcspError:
                    pass  # e.g. a CA that stopped being served: answered again when asked
                except StoreError as exc:
                    log.info("OCSP pre-signing postponed: {error}", error=str(exc))
                    return
                except Exception:  # noqa: BLE001 - a bug: logged, re-signed on demand
                    log.failure("OCSP pre-signing failed")
                finally:
                    left -= 1
                    self._queued(-1)
                yield None
        finally:
            if left:
                self._queued(-left)

    def signer_expiries(self) -> dict[str, datetime]:
        """Signer notAfter by CA (for /healthz and /metrics)."""
        return {name: s.not_after for name, s in self.signers.items()}

    def warn_expiring(self) -> list[str]:
        """Log (and return) a warning per signer expiring within 30 days."""
        now = self.now()
        warnings = [w for s in self.signers.values() if (w := expiry_warning(s, now))]
        for w in warnings:
            log.warn("{warning}", warning=w)  # noqa: G010 - twisted.logger has no .warning
        return warnings

    # --- requests ------------------------------------------------------------------------

    def respond(self, der: bytes) -> Outcome:
        """The response to one DER request; never raises."""
        now = self.now()
        entry = self.lookup(der, now)
        if entry is not None:
            return self.outcome(entry, "hit")
        return self.respond_miss(der, now)

    def lookup(self, der: bytes, now: datetime) -> CachedResponse | None:
        """The live pre-signed response to exactly these request bytes (counted hit or miss)."""
        if len(der) > CACHEABLE_REQUEST_BYTES or self.requestors.mode == "require":
            return None  # "require": every request is signed, none is under its raw bytes
        key = raw_key(der)
        entry = self.cache.get(key, now)
        if entry is None and len(self.unknown):
            entry = self.unknown.get(key, now)
        return entry

    def respond_later(self, der: bytes) -> Outcome | defer.Deferred[Outcome]:
        """``respond``, with a miss answered by ``miss`` (a Deferred when threaded)."""
        now = self.now()
        entry = self.lookup(der, now)
        if entry is not None:
            return self.outcome(entry, "hit")
        return self.respond_to(der, now)

    def respond_to(self, der: bytes, now: datetime,
                   client: str = "-") -> Outcome | defer.Deferred[Outcome]:
        """The answer to a request ``lookup`` did not find (client: its address): through
        the signing queue when there is one (``server.ocsp.signing``), else ``respond_miss``
        inline or in a store thread (a Deferred that never fails). The one call on the
        request path that may read the store and sign."""
        if self.signing is not None:
            return self.signing.submit(der, now, client)  # type: ignore[no-any-return]
        if self.access is None:
            return self.respond_miss(der, now)
        if self.access.busy():
            return Outcome(encode_error("try_later"), "try_later", "-",
                           reason="store threads busy")
        d: defer.Deferred[Outcome] = self.access.run(self.respond_miss, der, now)
        return d.addErrback(self._failed)

    @staticmethod
    def _failed(failure: Failure) -> Outcome:
        log.failure("OCSP request failed", failure)
        return Outcome(encode_error("internal_error"), "internal_error", "-",
                       reason="internal error")

    def respond_miss(self, der: bytes, now: datetime) -> Outcome:
        """The response to a request ``lookup`` did not find; never raises."""
        try:
            request = parse_request(der, self.max_certids)
            return self._respond(der, request, now)
        except OcspError as exc:
            return Outcome(encode_error(exc.status), exc.status, "-", reason=str(exc))
        except Exception:  # noqa: BLE001 - a bug: internalError, traceback in the log
            log.failure("OCSP request failed")
            return Outcome(encode_error("internal_error"), "internal_error", "-",
                           reason="internal error")

    def _respond(self, der: bytes, request: OcspRequest, now: datetime, *,
                 fresh: bool = False) -> Outcome:
        epoch = self.cache.epoch  # before any store read: see ResponseCache.put
        return self.settle(self.compute_parsed(der, request, now, peek=not fresh), epoch)

    def compute(self, der: bytes, now: datetime, *, sign_unknown: bool = True,
                peek: bool = True) -> Signed:
        """The response to a request ``lookup`` did not find, not yet kept in any cache
        (``settle`` does that where the caches live); never raises. A signing process runs
        this with ``peek=False`` (it has no cache: its parent looked already)."""
        try:
            request = parse_request(der, self.max_certids)
            return self.compute_parsed(der, request, now, sign_unknown=sign_unknown,
                                       peek=peek)
        except OcspError as exc:
            return Signed(Outcome(encode_error(exc.status), exc.status, "-", reason=str(exc)))
        except Exception:  # noqa: BLE001 - a bug: internalError, traceback in the log
            log.failure("OCSP request failed")
            return Signed(Outcome(encode_error("internal_error"), "internal_error", "-",
                                  reason="internal error"))

    def compute_parsed(self, der: bytes, request: OcspRequest, now: datetime, *,
                       sign_unknown: bool = True, peek: bool = True) -> Signed:
        """``compute`` for a parsed request; raises OcspError."""
        # Before any cache: a response cached for the same CertIDs goes to authorized
        # requestors only. A checked signed request is never cached under its raw bytes (its
        # requestor certificate may expire or be revoked meanwhile), so a raw hit is always
        # an unsigned request, which needs no check.
        self.requestors.check(request, now, self.store)
        cacheable = (request.nonce is None and len(request.cert_ids) <= CACHEABLE_CERTIDS
                     and len(der) <= CACHEABLE_REQUEST_BYTES)
        keys = () if request.signed and self.requestors.active else (raw_key(der),)
        ckey = certids_key(c.der for c in request.cert_ids)
        if cacheable and peek:
            found = self.peek_certids(ckey, now)
            if found is not None:
                entry, unknown = found
                return Signed(self.outcome(entry, "hit"), entry, keys, unknown)
        if peek and (parts := self.nonce_parts(request, now)) is not None:
            entry = parts[1]
            return Signed(self.nonce_outcome(entry, self.sign_nonce(
                *nonce_signing(entry, request.nonce or b"", now))))
        result = answer(request, self.store, now, self.policy)
        unknown = never_issued(result)
        if unknown and not sign_unknown:
            return Signed(Outcome(encode_error("try_later"), "try_later", "-",
                                  reason="never-issued serials over this address's rate"),
                          unknown=True)
        signer = result.policy.signer
        responses = encode_responses_der(result.singles)
        produced = _produced_at_der(result.produced_at)
        signed = self.sign_der(signer, produced, responses, result.nonce,
                               result.extended_revoke)
        validity = result.policy.validity
        entry = CachedResponse(
            der=signed, etag=etag_of(signed), ca_id=result.ca.id, ca_name=result.ca.name,
            produced_at=result.produced_at, this_update=result.this_update,
            next_update=result.next_update,
            refresh_at=min(result.produced_at + validity / 2, result.next_update),
            serials=result.serials,
            summary=tuple((s.cert_id.serial, s.status) for s in result.singles),
            request=der if keys and not unknown else b"",
            responses=responses, extended_revoke=result.extended_revoke,
        )
        if cacheable:
            return Signed(self.outcome(entry, "miss"), entry, (*keys, ckey), unknown)
        out = self.outcome(entry, "nonce" if request.nonce is not None else "miss",
                           nonce=request.nonce is not None)
        if (request.nonce is not None and not unknown and self.requestors.mode != "require"
                and len(request.cert_ids) <= CACHEABLE_CERTIDS):
            # Keep the answer for these CertIDs without the nonce as well (one more
            # signature, once per status and half-life): the next nonce request for them is
            # then answered from its pre-encoded parts by one signature (``nonce_parts``),
            # and a request without a nonce is a hit.
            plain = plain_request_der([c.der for c in request.cert_ids])
            plain_der = self.sign_der(signer, produced, responses, None, result.extended_revoke)
            entry = replace(entry, der=plain_der, etag=etag_of(plain_der), request=plain)
            return Signed(out, entry, (raw_key(plain), ckey))
        return Signed(out, None, (), unknown)

    def nonce_parts(self, request: OcspRequest,
                    now: datetime) -> tuple[bytes, CachedResponse] | None:
        """For a nonce request: (CertIDs key, cached answer) whose pre-encoded parts make its
        answer with one signature (``sign_nonce``), when the CertIDs have a live answer that
        may go to this request without a requestor check; else None (computed in full)."""
        if (request.nonce is None or len(request.cert_ids) > CACHEABLE_CERTIDS
                or not self.checked_without_store(request)):
            return None
        ckey = certids_key(c.der for c in request.cert_ids)
        entry = self.cache.peek(ckey, now)
        if entry is None or not entry.responses:
            return None
        return ckey, entry

    def sign_nonce(self, ca_name: str, produced_at: int, responses: bytes, nonce: bytes,
                   extended_revoke: bool) -> tuple[str, bytes | str]:
        """Sign a nonce answer from a cached answer's parts (``nonce_parts``), produced at
        POSIX second produced_at: ("successful", response DER), or (error status, reason)
        when the CA is no longer served or its signer cannot sign now; never raises."""
        policy = self.policy.cas.get(ca_name)
        if policy is None:
            return "try_later", f"CA {ca_name} is not served (reloaded)"
        try:
            return "successful", self.sign_der(policy.signer, produced_at_der(produced_at),
                                               responses, nonce, extended_revoke)
        except OcspError as exc:
            return exc.status, str(exc)
        except Exception:  # noqa: BLE001 - a bug: internalError, traceback in the log
            log.failure("OCSP nonce signing failed")
            return "internal_error", "internal error"

    @staticmethod
    def nonce_outcome(entry: CachedResponse, signed: tuple[str, bytes | str]) -> Outcome:
        """The exchange of a nonce request answered by ``sign_nonce`` from entry's parts."""
        status, value = signed
        if status != "successful":
            return Outcome(encode_error(status), status, "-", reason=str(value))
        assert isinstance(value, bytes)
        return OcspService.outcome(entry, "nonce", nonce=True, der=value)

    def peek_certids(self, ckey: bytes, now: datetime) -> tuple[CachedResponse, bool] | None:
        """The live response cached for these CertIDs, and whether it is a never-issued one."""
        entry = self.cache.peek(ckey, now)
        if entry is not None:
            return entry, False
        entry = self.unknown.peek(ckey, now)
        return (entry, True) if entry is not None else None

    def settle(self, signed: Signed, epoch: int) -> Outcome:
        """Keep what ``compute`` signed: real answers in the response cache, answers about
        never-issued serials in their own bounded cache (so that a flood of made-up serials
        cannot evict real answers); ``epoch`` as in ``ResponseCache.put``."""
        if signed.entry is not None and signed.keys:
            cache = self.unknown if signed.unknown else self.cache
            cache.put(signed.keys, signed.entry, epoch)
        return signed.outcome

    def cached_answer(self, der: bytes, request: OcspRequest, now: datetime) -> Outcome | None:
        """The answer cached for the CertIDs of a request the raw-bytes lookup missed (a
        request spelled otherwise), when it needs no requestor check; else None."""
        if (request.nonce is not None or len(request.cert_ids) > CACHEABLE_CERTIDS
                or len(der) > CACHEABLE_REQUEST_BYTES or not self.checked_without_store(request)):
            return None
        found = self.peek_certids(certids_key(c.der for c in request.cert_ids), now)
        if found is None:
            return None
        entry, unknown = found
        keys = () if request.signed and self.requestors.active else (raw_key(der),)
        return self.settle(Signed(self.outcome(entry, "hit"), entry, keys, unknown),
                           self.cache.epoch)

    def presigned_answer(self, request: OcspRequest, now: datetime) -> Outcome | None:
        """For a nonce request shed under overload: the pre-signed response to its CertIDs,
        without the nonce (RFC 5019 §2.1 lets a responder leave it out); None if none."""
        if len(request.cert_ids) > CACHEABLE_CERTIDS or not self.checked_without_store(request):
            return None
        found = self.peek_certids(certids_key(c.der for c in request.cert_ids), now)
        if found is None:
            return None
        return replace(self.outcome(found[0], "shed"), reason="overload: pre-signed, no nonce")

    def checked_without_store(self, request: OcspRequest) -> bool:
        """Whether a cached answer may go to this request without a requestor check."""
        mode = self.requestors.mode
        return mode == "ignore" or (mode == "verify" and not request.signed)

    @staticmethod
    def sign_der(signer: Signer, produced_at: bytes, responses: bytes, nonce: bytes | None,
                 extended_revoke: bool) -> bytes:
        """A signed OCSPResponse from the pre-encoded parts of its ResponseData."""
        data = response_data_der(responder_id_der(signer.responder_id), produced_at,
                                 responses, nonce=nonce, extended_revoke=extended_revoke)
        return encode_response_der(data, signer.sign, signer.algorithm_der, signer.certs)

    @staticmethod
    def outcome(entry: CachedResponse, cache: str, *, nonce: bool = False,
                der: bytes | None = None) -> Outcome:
        """The exchange a cached response answers (``cache``: hit, miss or nonce); der: the
        response sent instead of the cached one (a nonce answer signed from its parts)."""
        return Outcome(
            der=entry.der if der is None else der, status="successful", cache=cache, ca=entry.ca_name,
            serials=tuple(s for s, _ in entry.summary),
            statuses=tuple(st for _, st in entry.summary), nonce=nonce,
            etag=None if nonce else entry.etag, this_update=entry.this_update,
            next_update=entry.next_update,
        )

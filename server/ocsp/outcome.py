"""What one OCSP exchange comes to, and the seam for what needs a signature.

Strategy: plain values the service, the signing seam and the HTTP adapter pass around —
``Outcome`` (what is sent and logged; ``Outcome.error`` for every unsigned error answer),
``Signed`` (what a signer computed, for ``OcspService.settle`` to keep), ``Work`` (a request
``OcspService.triage`` found needing a signature) — and the seam itself: ``Signing``, with
``InlineSigning`` (sign at once, what a service built in code uses; the server's is
``server.ocsp.signing.SigningQueue``). No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from server.ocsp.cache import CachedResponse, Ready
from server.ocsp.codec import InternalError, OcspError, OcspRequest, encode_error

if TYPE_CHECKING:
    from server.ocsp.service import OcspService


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
    # a hit by raw bytes: the cache's ``Ready`` of it, which the adapter's views keep
    ready: Ready | None = field(default=None, compare=False, repr=False)

    @classmethod
    def error(cls, exc: OcspError) -> Outcome:
        """The unsigned answer to an OCSP error (RFC 6960 §2.3), its message the reason."""
        return cls(encode_error(exc.status), exc.status, "-", reason=str(exc))


INTERNAL_ERROR = Outcome.error(InternalError("internal error"))


@dataclass(frozen=True)
class Signed:
    """A response computed for a cache miss, with what ``OcspService.settle`` keeps of it."""

    outcome: Outcome
    entry: CachedResponse | None = None  # to cache under keys (None: nothing to keep)
    keys: tuple[bytes, ...] = ()
    unknown: bool = False  # every CertID names a serial the store does not know


class Work(NamedTuple):
    """A request that needs a signature, as ``triage`` hands it to the signing seam (a
    named tuple: made once per request that needs a signature, on the reactor thread)."""

    der: bytes
    request: OcspRequest
    now: datetime
    client: str
    # a nonce request whose CertIDs have a live cached answer: (CertIDs key, that answer),
    # signed from its pre-encoded parts (``OcspService.sign_nonce``)
    parts: tuple[bytes, CachedResponse] | None = None


class Signing(Protocol):
    """The asynchronous seam: what needs a signature goes through ``submit``."""

    def submit(self, der: bytes, now: datetime, client: str) -> Any:
        """The outcome of a request the raw-bytes cache did not answer: an ``Outcome``,
        or a Deferred firing with one (never failing)."""

    def reload(self, config: Any) -> None: ...

    def stop(self) -> Any: ...


class InlineSigning:
    """The seam without a queue: triage, then sign and keep at once (a service built in code;
    the server signs through ``server.ocsp.signing.SigningQueue``)."""

    def __init__(self, service: OcspService) -> None:
        self.service = service

    def submit(self, der: bytes, now: datetime, client: str = "-") -> Outcome:
        service = self.service
        work = service.triage(der, now, client)
        if isinstance(work, Outcome):
            return work
        epoch = service.cache.epoch  # before any store read: see ResponseCache.put
        if work.parts is not None:
            entry = work.parts[1]
            signed = Signed(service.nonce_outcome(entry, service.sign_nonce(
                *nonce_signing(entry, work.request.nonce or b"", now))))
        else:
            signed = service.compute(der, now, request=work.request)
        return service.settle(signed, epoch)

    def reload(self, config: Any) -> None:
        pass

    def stop(self) -> Any:
        return None


def nonce_signing(entry: CachedResponse, nonce: bytes, now: datetime) -> tuple[Any, ...]:
    """The arguments of ``OcspService.sign_nonce`` for a nonce request answered at now from
    the parts of entry (also what goes to a signing process)."""
    return (entry.ca_name, int(now.timestamp()), entry.responses, nonce, entry.extended_revoke)

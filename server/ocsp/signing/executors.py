"""Who signs for the signing queue: the ``Executor`` interface and ``LocalSigners`` (the
server process itself: in the store threads, or on the reactor one request per turn); the
signing processes are ``server.ocsp.signing.processes.ProcessSigners``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet import defer

from server.ocsp.cache import CachedResponse
from server.ocsp.service import OcspService, Signed, nonce_signing


class Executor(ABC):
    """Runs ``OcspService.compute`` somewhere; ``on_free`` is called when a slot frees up.
    ``free`` and ``run`` are what each kind of signer must say; the rest has defaults."""

    on_free: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]

    @abstractmethod
    def free(self) -> bool:
        """Whether a request can be handed over now."""

    def refuses(self) -> bool:
        """Whether requests must be shed now, queue or not."""
        return False

    @abstractmethod
    def run(self, der: bytes, now: datetime, sign_unknown: bool) -> defer.Deferred[Signed]:
        """Compute the answer to der at now (signing ``unknown`` answers when sign_unknown)."""

    @abstractmethod
    def sign_nonce(self, entry: CachedResponse, nonce: bytes,
                   now: datetime) -> defer.Deferred[Signed]:
        """Sign the answer to a nonce request from the parts of entry, the cached answer to
        its CertIDs (``OcspService.sign_nonce``)."""

    def flush(self) -> None:
        """Send the requests handed over so far (an executor may gather them)."""

    def reload(self, config: Any) -> None:
        """New signers (SIGHUP); the server's own service has reloaded already."""

    def stop(self) -> Any:
        return None


class LocalSigners(Executor):
    """Signs in the server process: in the store threads, or on the reactor one per turn."""

    def __init__(self, service: OcspService, access: Any, reactor: Any) -> None:
        self.service = service
        self.access = access if access is not None and not access.inline else None
        self.reactor = reactor
        self.slots = self.access.threads if self.access is not None else 1
        self.busy = 0

    def refuses(self) -> bool:
        return self.access is not None and self.access.busy()  # a dead database

    def free(self) -> bool:
        return self.busy < self.slots

    def run(self, der: bytes, now: datetime, sign_unknown: bool) -> defer.Deferred[Signed]:
        self.busy += 1
        compute = self.service.compute
        if self.access is not None:
            d: defer.Deferred[Signed] = self.access.run(compute, der, now,
                                                        sign_unknown=sign_unknown)
        else:  # inline: on the reactor thread, as without a queue
            d = defer.succeed(compute(der, now, sign_unknown=sign_unknown))
        return d.addBoth(self._done)

    def sign_nonce(self, entry: CachedResponse, nonce: bytes,
                   now: datetime) -> defer.Deferred[Signed]:
        self.busy += 1
        service = self.service
        args = nonce_signing(entry, nonce, now)
        if self.access is not None:
            d: defer.Deferred[Any] = self.access.run(service.sign_nonce, *args)
        else:
            d = defer.succeed(service.sign_nonce(*args))
        d.addCallback(lambda r: Signed(service.nonce_outcome(entry, r)))
        return d.addBoth(self._done)

    def _done(self, result: Any) -> Any:
        self.busy -= 1
        return result

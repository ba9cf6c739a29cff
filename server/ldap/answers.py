"""Pre-encoded search answers: the BER of every SearchResultEntry and of the Done, bounded,
voided by the change feed.

Strategy: the searches clients repeat — ``(mail=x)`` from a mail client, a base search at a
subject or CA DN from Java's CertStore and CDP/AIA URLs, certificateExactMatch — answer
with the same PDUs every time except for the messageID. An ``Answer`` keeps each response's
protocolOp (and controls) encoded once; answering is framing them with the request's
messageID, no store read, no filter evaluation, no BER encoding of the entries. Two kinds of
key find an answer, as in the OCSP cache: the request's own bytes after its messageID (the
hot path: looked up before the request is decoded at all), and a normalised key (base DN
key, scope, the filter as re-rendered text, the requested attributes lower-cased, typesOnly,
the effective size limit), so a request spelled differently finds the answer the first
spelling produced. Only a successful, unpaged search without controls is kept; an answer
knows until when it is right (the first notAfter among the certificates it shows: an entry
changes with time only when one expires) and is not served after that.

Invalidation: an answer depends on the entries it shows and, for a search that is not a base
search at a subject, CA or glue entry, on every certificate that could come to match its
filter. So a change-feed batch drops the base answers at the keys it touched and every other
answer whenever a certificate changed; a CA, CRL or unkeyed change drops everything. With a
threaded store answers are computed in store threads while the feed delivers on the reactor
thread: ``epoch`` counts invalidations, a search reads it before its first store read, and
``put`` refuses an answer computed across an invalidation (it may show what the change
voided). Memory is bounded by ``max_bytes`` (the answers' BER plus a fixed overhead each);
the least recently used answers go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.ldap.codec import MAX_INT, tlv_header
from store.model import Change

OVERHEAD = 1150  # bytes of Python objects per answer besides its BER (measured: tracemalloc)
MAX_ANSWER_BYTES = 256 * 1024  # a larger answer is not kept (it would evict many small ones)

NormalKey = tuple[str, int, str, tuple[str, ...], bool, int]


# The longest messageID INTEGER read on the fast path: 4 octets hold MAX_INT, and a few
# leading zero octets of padding are taken as a BER reader would.
MESSAGE_ID_OCTETS = 8


def message_id_bytes(message_id: int) -> bytes:
    """The BER INTEGER of a messageID (tag, length, minimal two's complement)."""
    body = message_id.to_bytes(max(1, (message_id.bit_length() + 8) // 8), "big")
    return bytes((0x02, len(body))) + body


def frame(message_id: int, op: bytes) -> bytes:
    """One LDAPMessage: messageID then the encoded protocolOp (and controls)."""
    mid = message_id_bytes(message_id)
    return tlv_header(0x30, len(mid) + len(op)) + mid + op


def split_message_id(pdu: bytes) -> tuple[int, bytes] | None:
    """(messageID, the rest) of a whole LDAPMessage PDU whose messageID is a non-negative
    INTEGER in range; None otherwise (the full decoder then says what is wrong).

    A messageID padded with leading zero octets (``02 04 00 00 00 01``: strictly not DER, but
    BER readers such as slapd's take it) is read as its value, so such a client reaches the
    pre-encoded answers too; the answer carries the minimal encoding, as slapd's does."""
    if len(pdu) < 7:
        return None
    first = pdu[1]
    pos = 2 if first < 0x80 else 2 + (first & 0x7F)
    if pos + 2 > len(pdu) or pdu[pos] != 0x02:
        return None
    n = pdu[pos + 1]
    if not 1 <= n <= MESSAGE_ID_OCTETS or pos + 2 + n > len(pdu):
        return None
    raw = pdu[pos + 2 : pos + 2 + n]
    if raw[0] & 0x80:
        return None  # negative: the decoder refuses it
    message_id = int.from_bytes(raw, "big")
    if message_id > MAX_INT:
        return None
    return message_id, pdu[pos + 2 + n :]


@dataclass(eq=False, slots=True)
class Answer:
    """A whole search answer without messageIDs, and what its log lines say."""

    ops: tuple[bytes, ...]  # each SearchResultEntry's protocolOp, then the Done's
    entries: int
    until: float  # POSIX seconds: not served from then on
    keys: frozenset[str] | None  # the entry keys a base answer shows; None: any cert change
    log: tuple[str, int, int, str, str]  # base, scope, deref, filter text, attrs text
    size: int = 0
    raw: list[bytes] = field(default_factory=list)  # raw request keys that name this answer
    normal: NormalKey | None = None

    def __post_init__(self) -> None:
        self.size = sum(len(op) for op in self.ops) + OVERHEAD

    def encode(self, message_id: int) -> bytes:
        """The answer's PDUs for a request with this messageID."""
        mid = message_id_bytes(message_id)
        n = len(mid)
        return b"".join([tlv_header(0x30, n + len(op)) + mid + op for op in self.ops])


class AnswerCache:
    """Bounded LRU of pre-encoded answers, by raw request bytes and by normalised key."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.epoch = 0
        self.hits = 0
        self.misses = 0
        self._answers: OrderedDict[NormalKey, Answer] = OrderedDict()
        self._raw: dict[bytes, Answer] = {}
        self._by_key: dict[str, set[NormalKey]] = {}
        self._broad: set[NormalKey] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._answers)

    # --- lookups ---------------------------------------------------------------------------

    def by_raw(self, rest: bytes, now: float) -> Answer | None:
        """The answer for a request whose bytes after the messageID are rest."""
        answer = self._raw.get(rest)
        if answer is None:
            return None
        if answer.until <= now:
            self._drop_one(answer)
            return None
        return answer

    def by_normal(self, key: NormalKey, rest: bytes, now: float) -> Answer | None:
        """The answer for a normalised key; rest (this spelling) then finds it directly."""
        with self._lock:
            answer = self._answers.get(key)
            if answer is None:
                return None
            if answer.until <= now:
                self._evict(answer)
                return None
            self._answers.move_to_end(key)
            if rest not in self._raw and len(answer.raw) < 8:
                answer.raw.append(rest)
                self._raw[rest] = answer
                answer.size += len(rest)
                self.bytes += len(rest)
        return answer

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    # --- filling ---------------------------------------------------------------------------

    def put(self, key: NormalKey, rest: bytes, answer: Answer, epoch: int) -> bool:
        """Keep answer (computed from reads made after ``epoch`` was read); False when it is
        too large, the cache is off, or an invalidation came in between."""
        if not self.enabled or answer.size + len(rest) > min(self.max_bytes, MAX_ANSWER_BYTES):
            return False
        with self._lock:
            if epoch != self.epoch:
                return False
            old = self._answers.get(key)
            if old is not None:
                self._evict(old)
            answer.normal = key
            answer.raw = [rest]
            answer.size += len(rest)
            self._answers[key] = answer
            self._raw[rest] = answer
            self.bytes += answer.size
            if answer.keys is None:
                self._broad.add(key)
            else:
                for k in answer.keys:
                    self._by_key.setdefault(k, set()).add(key)
            while self.bytes > self.max_bytes and self._answers:
                self._evict(next(iter(self._answers.values())))
        return True

    def _drop_one(self, answer: Answer) -> None:
        with self._lock:
            if answer.normal is not None and self._answers.get(answer.normal) is answer:
                self._evict(answer)

    def _evict(self, answer: Answer) -> None:
        """Forget answer everywhere (the lock is held)."""
        key = answer.normal
        if key is None or self._answers.pop(key, None) is None:
            return
        self.bytes -= answer.size
        for rest in answer.raw:
            if self._raw.get(rest) is answer:
                del self._raw[rest]
        if answer.keys is None:
            self._broad.discard(key)
        else:
            for k in answer.keys:
                keys = self._by_key.get(k)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_key[k]

    # --- the change feed ---------------------------------------------------------------------

    def invalidate(self, changes: Sequence[Change]) -> None:
        """Change-feed subscriber: drop every answer the committed batches may have changed."""
        with self._lock:
            self.epoch += 1
            if not self._answers:
                return
            if any(c.kind != "cert" or c.directory_key is None for c in changes):
                self._clear()
                return
            doomed = set(self._broad)
            for c in changes:
                doomed |= self._by_key.get(c.directory_key or "", set())
            for key in doomed:
                answer = self._answers.get(key)
                if answer is not None:
                    self._evict(answer)

    def clear(self) -> None:
        with self._lock:
            self.epoch += 1
            self._clear()

    def _clear(self) -> None:
        self._answers.clear()
        self._raw.clear()
        self._by_key.clear()
        self._broad.clear()
        self.bytes = 0

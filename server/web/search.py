"""The search itself: a parsed ``Search`` in, one page of certificates out (store-backed).

Strategy: every lookup is one index range or key lookup, bounded before it runs — e-mail
(equality) and name (prefix) on ``cert_attrs (attr, value, cert_id)``, serial on
``certs (ca_id, serial)`` once per CA, fingerprint on ``certs (sha256)`` — and at most
``MAX_RESULTS + 1`` candidates are taken (the one more says "there are more: refine").
Only the page's certificates are read in full. A lookup on a detail the LDAP allowlist does
not make public finds nothing, as a directory filter on it would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from store.model import CaRecord, CertRecord
from server.web.query import MAX_RESULTS, PAGE_SIZE, Search

SCAN_LIMIT = 2000  # index entries a CA-restricted name or mail search examines at most


@dataclass(frozen=True)
class Found:
    """One page of a search's matches."""

    records: list[CertRecord]  # the page, in result order
    total: int  # matches listed (at most MAX_RESULTS)
    truncated: bool  # more matched than are listed

    @property
    def pages(self) -> int:
        return max(1, (self.total + PAGE_SIZE - 1) // PAGE_SIZE)


def find(store: Any, search: Search, cas: Mapping[int, CaRecord], ca_id: int | None,
         allowed: frozenset[str], limit: int = MAX_RESULTS) -> Found:
    """The page ``search.page`` of the certificates matching search (in CA ca_id if given),
    of at most ``limit`` matches listed (the privacy policy's cap)."""
    limit = min(limit, MAX_RESULTS)
    ids: list[int] = []
    seen: set[int] = set()
    truncated = False
    want = limit + 1

    def add(found: list[int]) -> None:
        for i in found:
            if i not in seen:
                seen.add(i)
                ids.append(i)

    ca_ids = [ca_id] if ca_id is not None else sorted(cas)
    if search.serial is not None and "certpubserialnumber" in allowed:
        add([r.id for r in store.certs_by_serial(ca_ids, search.serial)])
    if search.sha256 is not None and "usercertificate" in allowed:
        add([r.id for r in store.certs_by_sha256(search.sha256)
             if ca_id is None or r.ca_id == ca_id])
    for attr, value, prefix in (("mail", search.mail, False), ("cn", search.name, True)):
        if value and attr in allowed and len(ids) < want:
            found, more = store.attr_match_ids(attr, value, prefix=prefix, limit=want,
                                               ca_id=ca_id, scan=SCAN_LIMIT)
            truncated = truncated or more
            add(found)
    if len(ids) > limit:
        truncated = True
        del ids[limit:]
    start = (search.page - 1) * PAGE_SIZE
    page_ids = ids[start:start + PAGE_SIZE]
    records = store.certs_by_ids(page_ids) if page_ids else []
    return Found(records, len(ids), truncated)

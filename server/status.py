"""``certpub status``: the store's generation and, per CA, its certificates by status.

Shared by the CLI (``certpub status``) and the demo (which prints it after its import), so
neither imports the other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.config import Config
from store import open_store


def print_status(config: Config, now: datetime) -> None:
    """Print the store's generation and one line per CA (counts at ``now``) to stdout."""
    store = open_store(config.store.location, create=False,
                       migrate=config.store.migrate == "auto")
    try:
        rows = store.stats(now)
        print(f"store {config.store.shown}  generation {store.generation()}")
        # The four counts partition the CA's certificates and add up to "total": "revoked"
        # leaves out the certificates on hold, "expired" counts only the never-revoked ones.
        header = (f"{'CA':<12} {'good':>8} {'revoked':>8} {'on hold':>8} {'expired':>8}"
                  f" {'total':>8}  {'CRL':>5}  {'CRL nextUpdate':<20}  last import")
        print(header)
        for s in rows:
            nu = s.ca.crl_next_update.strftime("%Y-%m-%d %H:%M:%SZ") if s.ca.crl_next_update else "-"
            last = s.last_import.strftime("%Y-%m-%d %H:%M:%SZ") if s.last_import else "-"
            crl = str(s.ca.crl_number) if s.ca.crl_number is not None else "-"
            print(f"{s.ca.name:<12} {s.good:>8} {s.revoked:>8} {s.on_hold:>8} {s.expired:>8}"
                  f" {s.total:>8}  {crl:>5}  {nu:<20}  {last}")
        print_scopes(store, {s.ca.id: s.ca.name for s in rows}, now)
    finally:
        store.close()


def _when(v: datetime | None) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%SZ") if v is not None else "-"


def print_scopes(store: Any, names: dict[int, str], at: datetime) -> None:
    """The CRL scopes of each CA (full, partitions, deltas: RFC 5280 §5.2.4, §5.2.5), with
    their number, thisUpdate, nextUpdate ("OVERDUE" once past it) and URLs."""
    scopes = sorted((sc for sc in store.crl_scopes() if sc.ca_id in names),
                    key=lambda sc: (names[sc.ca_id], sc.idp_der is not None, sc.label))
    if not scopes:
        return
    print()
    print(f"{'CA':<12} {'CRL scope':<24} {'number':>8}  {'thisUpdate':<20}  "
          f"{'nextUpdate':<20}  URLs")
    for sc in scopes:
        overdue = "  OVERDUE" if sc.next_update is not None and sc.next_update < at else ""
        number = str(sc.number) if sc.number is not None else "-"
        print(f"{names[sc.ca_id]:<12} {sc.label:<24} {number:>8}  {_when(sc.this_update):<20}  "
              f"{_when(sc.next_update):<20}  {' '.join(sc.urls) or '-'}{overdue}")

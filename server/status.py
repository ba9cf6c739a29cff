"""``certpub status``: the store's generation and, per CA, its certificates by status.

Shared by the CLI (``certpub status``) and the demo (which prints it after its import), so
neither imports the other.
"""

from __future__ import annotations

from datetime import datetime

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
    finally:
        store.close()

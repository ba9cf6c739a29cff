"""CRL scopes as people see them: the CA table's rows, the JSON list, a certificate's CRL.

Strategy: pure functions over the store's ``CrlScope`` records (issue 23: one per CA, issuing
distribution point and delta). A scope is linked at the URL its certificates print when that
URL's host is one of ``[http] public_names`` (this server answers it there), else at
certpub's own path: ``/crl/<ca>.crl`` for the full scope, ``/crl/<ca>/<scope id>.crl`` for
any other. A certificate's page links the scope its CRL distribution point resolves to.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography import x509


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def is_full(scope: Any) -> bool:
    return scope.idp_der is None and not scope.delta


def scope_url(scope: Any, ca_name: str, public_names: Collection[str]) -> str:
    """Where a scope's CRL is downloaded: its printed URL when served here, else ours."""
    for url in scope.urls:
        if url.lower().startswith("http://") and _host(url) in public_names:
            return str(url)
    ca = quote(ca_name, safe="")
    return f"/crl/{ca}.crl" if is_full(scope) else f"/crl/{ca}/{scope.id}.crl"


def scope_rows(scopes: Iterable[Any], ca_names: Mapping[int, str],
               public_names: Collection[str], when: Callable[[datetime | None], str],
               now: datetime) -> list[dict[str, Any]]:
    """One row per scope, by CA then full scope first, then label."""
    rows = []
    for s in scopes:
        name = ca_names.get(s.ca_id)
        if name is None:
            continue
        rows.append({
            "ca": name, "id": s.id, "label": s.label, "delta": bool(s.delta),
            "number": "" if s.number is None else str(s.number),
            "this_update": when(s.this_update), "next_update": when(s.next_update),
            "this_update_dt": s.this_update, "next_update_dt": s.next_update,
            "stale": s.next_update is not None and s.next_update < now,
            "url": scope_url(s, name, public_names), "urls": list(s.urls),
            "_order": (name, not is_full(s), s.label),
        })
    rows.sort(key=lambda r: r["_order"])
    for r in rows:
        del r["_order"]
    return rows


def json_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows for ``/api/v1/cas``: ISO 8601 times, no display strings."""
    out = []
    for r in rows:
        out.append({"id": r["id"], "label": r["label"], "delta": r["delta"],
                    "number": int(r["number"]) if r["number"] else None,
                    "this_update": _iso(r["this_update_dt"]),
                    "next_update": _iso(r["next_update_dt"]),
                    "url": r["url"], "urls": r["urls"], "stale": r["stale"]})
    return out


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def distribution_urls(der: bytes) -> list[str]:
    """The http:// URLs of a certificate's CRL distribution points (RFC 5280 §4.2.1.13)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (ValueError, x509.ExtensionNotFound):
        return []
    return [n.value for p in points for n in (p.full_name or ())
            if isinstance(n, x509.UniformResourceIdentifier)
            and n.value.lower().startswith("http://")]


def covering_crl(store: Any, der: bytes | None, ca_name: str,
                 public_names: Collection[str]) -> str | None:
    """The link to the CRL that covers a certificate: the scope its distribution point
    names (resolved by the store), else None (the page links the CA's full CRL)."""
    resolve = getattr(store, "resolve_url", None)
    read_scope = getattr(store, "crl_scope", None)
    if der is None or resolve is None or read_scope is None:
        return None
    for url in distribution_urls(der):
        target = resolve(url)
        if target is None or target.scope_id is None:
            continue
        scope = read_scope(target.scope_id)
        if scope is not None:
            return scope_url(scope, ca_name, public_names)
    return None

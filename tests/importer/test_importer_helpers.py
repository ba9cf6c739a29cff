"""A small, fast PKI for importer tests (EC P-256, one reused subscriber key) and store dumps."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.config import Config, load_config
from store import is_postgres_url, open_store

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
# For a test about the SQLite file itself (WAL, file locks, corruption, permissions): it runs
# on the SQLite engine only, though it takes the two-engine ``store_location`` fixture.
sqlite_only = pytest.mark.parametrize("store_location", ["sqlite"], indirect=True)
DAY = timedelta(days=1)
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def name(cn: str, o: str = "Test Org") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, o),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    """One CA: its key and certificate."""

    def __init__(self, label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.label, self.cert, self.key = label, cert, key


class MiniPki:
    """root -> ca-a, ca-b (configured) and an unconfigured "foreign" CA; certificates on demand."""

    def __init__(self, folder: Path, now: datetime = NOW, store: str | Path | None = None) -> None:
        self.folder = folder
        # The store its configurations name: an SQLite path or a PostgreSQL URL.
        self.store_location = str(store or folder / "store" / "store.sqlite3")
        self.now = now
        folder.mkdir(parents=True, exist_ok=True)
        self.sub_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca("root", "Test Root CA", None, 1)
        self.cas = {"root": self.root,
                    "ca-a": self._ca("ca-a", "Test CA A", self.root, 2),
                    "ca-b": self._ca("ca-b", "Test CA B", self.root, 3)}
        self.foreign = self._ca("foreign", "Test CA A", None, 9)  # same name as ca-a, other key
        for label in self.cas:
            (folder / f"{label}.pem").write_bytes(self.cas[label].cert.public_bytes(PEM))

    def _ca(self, label: str, cn: str, parent: Ca | None, serial: int,
            key: ec.EllipticCurvePrivateKey | None = None, not_before: datetime | None = None) -> Ca:
        key = key or ec.generate_private_key(ec.SECP256R1())
        nb = not_before or self.now - 400 * DAY
        cert = (x509.CertificateBuilder().subject_name(name(cn))
                .issuer_name(parent.cert.subject if parent else name(cn))
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(nb).not_valid_after(nb + 3650 * DAY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(parent.key if parent else key, hashes.SHA256()))
        return Ca(label, cert, key)

    def reissue(self, label: str, days_later: int) -> x509.Certificate:
        """The same CA (name and key) certified again, notBefore moved by days_later."""
        ca = self.cas[label]
        parent = None if label == "root" else self.root
        nb = ca.cert.not_valid_before_utc + days_later * DAY
        cn = str(ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        return self._ca(label, cn, parent, ca.cert.serial_number + 100 + days_later, key=ca.key,
                        not_before=nb).cert

    def cert(self, ca: str | Ca, serial: int, cn: str | None = None, *,
             email: str | None = None, days: int = 365) -> x509.Certificate:
        issuer = self.cas[ca] if isinstance(ca, str) else ca
        cn = cn or f"User {serial:x}"
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer.cert.subject)
             .public_key(self.sub_key.public_key()).serial_number(serial)
             .not_valid_before(self.now - DAY).not_valid_after(self.now + days * DAY))
        if email:
            b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), False)
        return b.sign(issuer.key, hashes.SHA256())

    def crl(self, ca: str | Ca, number: int | None,
            entries: list[tuple[int, x509.ReasonFlags | None]],
            this_update: datetime | None = None) -> x509.CertificateRevocationList:
        issuer = self.cas[ca] if isinstance(ca, str) else ca
        tu = this_update or self.now - timedelta(hours=1) + timedelta(minutes=number or 0)
        b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
             .last_update(tu).next_update(tu + 7 * DAY))
        if number is not None:
            b = b.add_extension(x509.CRLNumber(number), critical=False)
        for serial, reason in entries:
            e = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(
                self.now - 2 * DAY)
            if reason is not None:
                e = e.add_extension(x509.CRLReason(reason), critical=False)
            b = b.add_revoked_certificate(e.build())
        return b.sign(issuer.key, hashes.SHA256())

    def config(self, *, spool: list[Path] | None = None, processed: str = "move",
               batch_size: int = 500, openssl: list[tuple[str, Path, Path]] = (),  # type: ignore[assignment]
               store: str | Path | None = None, poll_interval: float = 0.2,
               cas: tuple[str, ...] = ("root", "ca-a", "ca-b")) -> Config:
        """Write certpub.toml and load it like the CLI does."""
        spool = spool if spool is not None else [self.folder / "spool"]
        location = str(store or self.store_location)
        key = "url" if is_postgres_url(location) else "path"
        lines = ["[store]", f"{key} = {location!r}".replace("'", '"'), "", "[import]",
                 "spool = [" + ", ".join(f'"{p}"' for p in spool) + "]",
                 f'processed = "{processed}"', f"batch_size = {batch_size}",
                 f"poll_interval = {poll_interval}", ""]
        for ca, index, certs_dir in openssl:
            lines += ["[[import.openssl]]", f'ca = "{ca}"', f'index = "{index}"',
                      f'certs_dir = "{certs_dir}"', ""]
        for label in cas:
            lines += ["[[ca]]", f'name = "{label}"', f'certificate = "{self.folder / label}.pem"', ""]
        lines += ["[log]", 'level = "debug"', ""]
        path = self.folder / "certpub.toml"
        path.write_text("\n".join(lines))
        return load_config(path)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pem(obj: Any) -> bytes:
    return bytes(obj.public_bytes(PEM))


def der(obj: Any) -> bytes:
    return bytes(obj.public_bytes(DER))


def clock(start: datetime = NOW) -> Any:
    """A clock that advances one second per call (so timestamps differ but stay predictable)."""
    state = {"t": start}

    def now() -> datetime:
        state["t"] += timedelta(seconds=1)
        return state["t"]

    return now


def dump(location: str | Path) -> dict[str, Any]:
    """Canonical content of a store (either engine): what must be equal after any crash and
    restart, or after a copy to another engine."""
    store = open_store(location, create=False, migrate=False)
    q = store._query
    try:
        cas = {r[0]: (r[1], r[2], hashlib.sha256(r[3]).hexdigest(),
                      None if r[4] is None else hashlib.sha256(r[4]).hexdigest())
               for r in q("SELECT name, crl_number, crl_this_update, cert_der, crl_der FROM cas")}
        certs = sorted(
            (r[0], r[1], r[2], r[3], r[4], None if r[5] is None else hashlib.sha256(r[5]).hexdigest())
            for r in q("SELECT a.name, c.serial, c.status, c.reason, c.revoked_at, c.der"
                       " FROM certs c JOIN cas a ON a.id = c.ca_id"))
        attrs = q("SELECT COUNT(*) FROM cert_attrs")[0][0]
        entries = sorted(r[0] for r in q("SELECT key FROM entries"))
    finally:
        store.close()
    return {"cas": cas, "certs": certs, "attrs": attrs, "entries": entries}


def status(location: str | Path) -> dict[tuple[str, int], tuple[str, str | None]]:
    """(CA name, serial) -> (status, reason)."""
    return {(ca, int(serial, 16)): (st, reason)
            for ca, serial, st, reason, _, _ in dump(location)["certs"]}

"""The search pages' store reads on both engines (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from importer.run import import_paths
from store import open_store
from tests.importer.test_importer_helpers import NOW, MiniPki, der, pem, write


def test_search_reads_on_both_engines(tmp_path: Path, store_location: str) -> None:
    pki = MiniPki(tmp_path / "pki", store=store_location)
    certs = {
        (ca, serial): pki.cert(ca, serial, cn, email=email)
        for ca, serial, cn, email in [
            ("ca-a", 0x80, "Ana Luísa", "ana@x.example"), ("ca-b", 0x80, "Ana Maria", None),
            ("ca-a", 0x81, "陳大文", "CHAN@x.example"), ("ca-a", 0x82, "anabela", "ana@x.example"),
        ]
    }
    files = [write(tmp_path / "in" / f"{ca}-{s:x}.pem", pem(c)) for (ca, s), c in certs.items()]
    import_paths(pki.config(), files, now=lambda: NOW, progress=None)
    store = open_store(store_location, create=False)
    try:
        cas = {c.name: c.id for c in store.cas()}
        ids, more = store.attr_match_ids("cn", "ana", prefix=True, limit=10)
        got = [r.cn for r in store.certs_by_ids(ids)]
        assert got == ["Ana Luísa", "Ana Maria", "anabela"] and not more  # in value order
        ids, more = store.attr_match_ids("cn", "ana", prefix=True, limit=2)
        assert len(ids) == 2
        ids, more = store.attr_match_ids("cn", "ana", prefix=True, limit=10, ca_id=cas["ca-b"],
                                         scan=2)
        assert [r.cn for r in store.certs_by_ids(ids)] == ["Ana Maria"] and more  # scan stopped
        ids, _ = store.attr_match_ids("mail", "ana@x.example", prefix=False, limit=10)
        assert sorted(r.serial for r in store.certs_by_ids(ids)) == [0x80, 0x82]
        ids, _ = store.attr_match_ids("cn", "陳", prefix=True, limit=10)
        assert [r.serial for r in store.certs_by_ids(ids)] == [0x81]
        both = store.certs_by_serial([cas["ca-a"], cas["ca-b"]], 0x80)
        assert sorted(r.ca_id for r in both) == sorted([cas["ca-a"], cas["ca-b"]])
        assert store.certs_by_serial([cas["ca-b"]], 0x81) == []
        digest = hashlib.sha256(der(certs[("ca-a", 0x81)])).digest()
        assert [r.serial for r in store.certs_by_sha256(digest)] == [0x81]
        assert store.certs_by_sha256(b"\x00" * 32) == []
        assert store.certs_by_ids([]) == []
    finally:
        store.close()

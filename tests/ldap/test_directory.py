"""The virtual directory over the demo store: entries, status marking, indexed searches."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from server.ldap.directory import BASE, ONE, SUB, Directory
from server.ldap.entries import parse_dn, render
from server.ldap.errors import AdminLimitExceeded, NoSuchObject
from server.ldap.filters import Filter, Match, Not, Or, Present, Substrings
from server.ldap.schema import select
from store.sqlite import Store

HIDDEN = ("telephonenumber", "street", "serialnumber", "2.5.4.20", "2.5.4.9", "2.5.4.5")


def run(d: Directory, base: str, scope: int, f: Filter, now: datetime) -> list[Any]:
    entry = d.base(parse_dn(base), now)
    return [h.entry for h in d.search(entry, scope, f, now) if h is not None]


def der(cert: Any) -> bytes:
    return cert.load().public_bytes(Encoding.DER)  # type: ignore[no-any-return]


def pick(demo_pki: Any, state: str, *, email: bool = True) -> Any:
    return next(c for c in demo_pki.certs if c.state == state and (c.emails or not email))


class Spy:
    """Wraps a store and records which read methods were called."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return target(*args, **kwargs)

        return call


def test_mail_lookup_uses_the_index_and_returns_only_usable_certificates(
        store: Store, directory: Directory, demo_pki: Any, demo_now: datetime) -> None:
    good = pick(demo_pki, "good")
    spy = Spy(store)
    d = Directory(spy, directory.allow)  # type: ignore[arg-type]
    found = run(d, "c=MO", SUB, Match("=", "mail", good.emails[0].upper().encode()), demo_now)
    assert "subtree" not in spy.calls and "children" not in spy.calls
    assert "published_matches" in spy.calls  # the equality index read
    subjects = [e for e in found if e.kind == "subject"]
    assert len(subjects) == 1
    assert der(good) in subjects[0].values("userCertificate")
    for state in ("revoked", "hold", "expired"):
        for c in demo_pki.certs:
            if c.state == state and c.emails:
                hits = run(directory, "c=MO", SUB, Match("=", "mail", c.emails[0].encode()), demo_now)
                assert all(der(c) not in e.values("userCertificate") for e in hits), (state, c)


def test_every_certificate_is_published_with_its_status(
        directory: Directory, demo_pki: Any, demo_now: datetime) -> None:
    expected = {"good": "valid", "revoked": "revoked", "hold": "revoked", "expired": "expired",
                "revoked-expired": "revoked"}
    seen = 0
    for c in demo_pki.certs:
        entries = run(directory, "c=MO", SUB,
                      Match("=", "certpubSerialNumber", format(c.serial, "X").encode()), demo_now)
        mine = [e for e in entries if e.kind == "cert" and der(c) in e.values("userCertificate")]
        assert len(mine) == 1, c
        status = mine[0].values("certpubStatus")[0]
        assert status == expected[c.state], (c.state, status)
        if status == "revoked":
            assert mine[0].values("certpubRevocationTime")
            reason = mine[0].values("certpubRevocationReason")[0]
            assert (reason == "certificateHold") == (c.state == "hold")
        seen += 1
        # the certificate entry can be read back by its DN, in another spelling
        again = directory.lookup(parse_dn(mine[0].dn.upper().replace("CERTPUBSERIALNUMBER", "certpubSerialNumber")), demo_now)
        assert again is not None and again.key == mine[0].key
    assert seen == len(demo_pki.certs)


def java_dn(cert: Any) -> str:
    """The subject DN as Java's X500Principal.getName(RFC2253) writes it: unknown types as OID=#hex."""
    from asn1crypto import x509 as ax

    name = ax.Certificate.load(cert.load().public_bytes(Encoding.DER)).subject
    rdns = []
    for rdn in reversed(list(name.chosen)):
        avas = []
        for atv in rdn:
            oid = atv["type"].dotted
            short = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.10": "O", "2.5.4.11": "OU",
                     "2.5.4.7": "L", "2.5.4.8": "ST"}.get(oid)
            value = atv["value"]
            if short is None:
                avas.append(f"{oid}=#{value.chosen.dump().hex() if hasattr(value, 'chosen') else value.dump().hex()}")
            else:
                text = str(value.native).replace("\\", "\\\\").replace(",", "\\,").replace("+", "\\+")
                avas.append(f"{short}={text}")
        rdns.append("+".join(avas))
    return ",".join(rdns)


def shows_hidden(dn: str) -> bool:
    return re.search(r"(^|[,+])\s*(" + "|".join(map(re.escape, HIDDEN)) + r")\s*=", dn.lower()) is not None


def test_base_search_at_full_subject_dn_as_java_spells_it(
        directory: Directory, demo_pki: Any, demo_now: datetime) -> None:
    hidden = [c for c in demo_pki.certs if c.state == "good" and any(
        o in c.subject_rfc4514.lower() for o in ("2.5.4.20", "serialnumber", "street"))]
    assert hidden, "the demo PKI has subjects with hidden attributes"
    for c in hidden[:3] + [pick(demo_pki, "good")]:
        java = java_dn(c)
        assert "#" in java
        entries = run(directory, java, BASE, Present("objectClass"), demo_now)
        assert len(entries) == 1 and der(c) in entries[0].values("userCertificate"), java
        assert not shows_hidden(entries[0].dn)


def test_allowlist_hides_private_attributes_everywhere(
        directory: Directory, demo_now: datetime) -> None:
    everything = run(directory, "c=MO", SUB, Present("objectClass"), demo_now)
    assert len(everything) > 50
    for e in everything:
        rendered = render(e, select(["*", "+", "telephoneNumber", "street", "serialNumber",
                                     "2.5.4.20"]), directory.allow, False)
        names_shown = {n.lower() for n, _ in rendered}
        assert not names_shown & {"telephonenumber", "street", "serialnumber"}
        assert not shows_hidden(e.dn)
    for probe in (Present("telephoneNumber"), Present("street"), Present("serialNumber"),
                  Not(Present("telephoneNumber")), Substrings("telephoneNumber", b"+853", (), None)):
        assert run(directory, "c=MO", SUB, probe, demo_now) == []


def test_outlook_and_thunderbird_filters(store: Store, directory: Directory, demo_pki: Any,
                                         demo_now: datetime) -> None:
    good = [c for c in demo_pki.certs if c.state == "good" and c.emails][:2]
    spy = Spy(store)
    d = Directory(spy, directory.allow)  # type: ignore[arg-type]
    both = Or(tuple(Match("=", "mail", c.emails[0].encode()) for c in good))
    found = run(d, "c=MO", SUB, both, demo_now)
    assert {e.values("mail")[0].lower() for e in found} >= {c.emails[0].lower() for c in good}
    auto = Or(tuple(Substrings(a, None, (b"an",), None) for a in ("cn", "mail", "givenName", "sn")))
    assert run(d, "c=MO", SUB, auto, demo_now)
    from server.ldap.filters import And

    outlook = And((Present("mail"), Or((Substrings("mail", b"ana", (), None),
                                        Or((Substrings("cn", b"ana", (), None),
                                            Or((Substrings("sn", b"ana", (), None),
                                                Substrings("givenName", b"ana", (), None)))))))))
    hits = run(d, "c=MO", SUB, outlook, demo_now)
    assert hits and all(e.values("mail") for e in hits)
    assert "subtree" not in spy.calls


def test_ca_entries(directory: Directory, demo_pki: Any, demo_now: datetime) -> None:
    from cryptography import x509 as cx509

    for name, ca in demo_pki.cas.items():
        cert = ca.load_certificate()
        entry = run(directory, cert.subject.rfc4514_string(), BASE, Present("objectClass"), demo_now)[0]
        assert cert.public_bytes(Encoding.DER) in entry.values("cACertificate")
        assert "pkiCA" in entry.values("objectClass")
        if ca.crl_path is not None:
            crl = cx509.load_pem_x509_crl(ca.crl_path.read_bytes()).public_bytes(Encoding.DER)
            assert crl in entry.values("certificateRevocationList")
        assert bool(entry.values("authorityRevocationList")) == (cert.issuer == cert.subject), name


def test_scopes_and_errors(directory: Directory, demo_now: datetime) -> None:
    top = run(directory, "", ONE, Present("objectClass"), demo_now)
    assert [e.dn for e in top] == ["c=MO"]
    orgs = run(directory, "c=MO", ONE, Present("objectClass"), demo_now)
    assert orgs and all(e.parsed.parent.key == parse_dn("c=MO").key for e in orgs)
    assert [e.kind for e in run(directory, "", BASE, Present("objectclass"), demo_now)] == ["dse"]
    with pytest.raises(NoSuchObject) as err:
        directory.base(parse_dn("cn=nobody,o=Nowhere,c=MO"), demo_now)
    assert err.value.matched == "c=MO"
    small = Directory(directory.store, directory.allow, scan_limit=5)
    with pytest.raises(AdminLimitExceeded):
        run(small, "c=MO", SUB, Match("=", "certpubStatus", b"revoked"), demo_now)


def test_subtree_walk_pages_through_everything(directory: Directory, demo_now: datetime) -> None:
    base = directory.base(parse_dn("c=MO"), demo_now)
    hits = [h for h in directory.search(base, SUB, Present("objectClass"), demo_now) if h]
    positions = [h.position for h in hits]
    assert len(set(positions)) == len(positions)
    for cut in (1, len(hits) // 3, len(hits) // 2 + 1, len(hits) - 1):
        rest = [h.entry.key for h in
                directory.search(base, SUB, Present("objectClass"), demo_now, positions[cut - 1]) if h]
        assert rest == [h.entry.key for h in hits[cut:]], cut


def test_crl_distribution_point_and_delta_entries() -> None:
    """An ldap:// CDP's DN: a cRLDistributionPoint entry with cn and the CRL its URL asks for,
    shown as ``;binary`` whichever spelling was asked; the allowlist still applies; a CA's
    entry carries its full scope's delta (deltaRevocationList, class deltaCRL)."""
    from server.ldap.entries import crldp_entry
    from server.ldap.schema import Allowlist
    from server.ldap.config import DEFAULT_ATTRIBUTES
    from store.model import DirectoryEntry

    dn = "CN=Demo EC Issuing CA part 1,OU=CRL,O=Example,C=MO"
    row = DirectoryEntry(parse_dn(dn).key, dn, parse_dn(dn).parent.key, "crldp")
    entry = crldp_entry(row, [("certificateRevocationList", b"\x30\x01"),
                              ("deltaRevocationList", b"\x30\x02")])
    assert entry.kind == "crldp"
    assert entry.values("objectClass") == ("top", "cRLDistributionPoint")
    assert entry.values("cn") == ("Demo EC Issuing CA part 1",)
    allow = Allowlist.of(DEFAULT_ATTRIBUTES)
    for asked in ("certificateRevocationList", "certificateRevocationList;binary"):
        assert render(entry, select([asked]), allow, False) == [
            ("certificateRevocationList;binary", [b"\x30\x01"])]
    assert render(entry, select(["deltaRevocationList"]), allow, False) == [
        ("deltaRevocationList;binary", [b"\x30\x02"])]
    narrow = Allowlist.of(("objectClass", "cn", "certificateRevocationList"))
    assert render(entry, select(["deltaRevocationList"]), narrow, False) == []
    ou = "OU=CRL,O=Example,C=MO"  # a DN without cn: its RDN's value stands for cn
    bare = crldp_entry(DirectoryEntry(parse_dn(ou).key, ou, None, "crldp"), [])
    assert bare.values("cn") == ("CRL",)


def test_ca_entry_carries_its_full_scopes_delta(directory: Directory, demo_now: datetime) -> None:
    from server.ldap.entries import ca_entry

    rows = [e for cas in directory._ca_map().values() for e in cas]
    ca = rows[0]
    row = directory.store.entry(ca.directory_key)
    assert row is not None
    entry = ca_entry(row, [ca], [], demo_now, [("deltaRevocationList", b"\x30\x03")])
    assert "deltaCRL" in entry.values("objectClass")
    assert entry.values("deltaRevocationList") == (b"\x30\x03",)

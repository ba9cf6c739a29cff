"""crl_input's fast entry reading (cryptography) against the reference one (asn1crypto)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import crl as asn1crl
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier

from store import certparse
from store.certparse import ParseError, crl_input
from store.model import CaId, RevocationReason, RevokedEntry

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
ISSUER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Parse Test CA")])
REASON_OID = ObjectIdentifier("2.5.29.21")

Ext = tuple[x509.ExtensionType, bool]


def make_crl(entries: list[tuple[int, datetime, list[Ext]]], number: int | None = 7) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(ISSUER)
         .last_update(NOW).next_update(NOW + timedelta(days=7)))
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    for serial, when, exts in entries:
        e = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        for ext, critical in exts:
            e = e.add_extension(ext, critical=critical)
        b = b.add_revoked_certificate(e.build())
    return b.sign(KEY, hashes.SHA256()).public_bytes(Encoding.DER)


def reference(der: bytes) -> list[RevokedEntry]:
    tbs = asn1crl.CertificateList.load(der, strict=True)["tbs_cert_list"]
    return certparse._entries_asn1crypto(tbs)


def check_same(der: bytes) -> list[RevokedEntry]:
    fast = certparse._entries_fast(der)
    assert fast is not None, "the fast path should have read this CRL"
    assert fast == reference(der)
    assert list(crl_input(der, CaId(1)).entries) == fast
    return fast


def test_every_reason_and_no_reason() -> None:
    flags = list(x509.ReasonFlags)
    entries: list[tuple[int, datetime, list[Ext]]] = [
        (i + 1, NOW - timedelta(days=i, seconds=i), [(x509.CRLReason(f), False)])
        for i, f in enumerate(flags)
    ]
    entries.append((0x7FFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFFF_FFFF, NOW, []))  # no reason, 16 bytes
    got = check_same(make_crl(entries))
    assert {e.reason for e in got} == set(RevocationReason) | {None}


def test_remove_from_crl_and_hold_with_other_extensions() -> None:
    # holdInstructionCode (RFC 5280 §5.3.2, removed since) = id-holdinstruction-callissuer
    hold = x509.UnrecognizedExtension(ObjectIdentifier("2.5.29.23"),
                                      bytes.fromhex("06072a8648ce380202"))
    entries: list[tuple[int, datetime, list[Ext]]] = [
        (10, NOW, [(x509.CRLReason(x509.ReasonFlags.certificate_hold), False), (hold, False)]),
        (11, NOW, [(x509.CRLReason(x509.ReasonFlags.remove_from_crl), False)]),
        (12, NOW, [(x509.CRLReason(x509.ReasonFlags.key_compromise), False),
                   (x509.InvalidityDate(datetime(2026, 1, 2, 3, 4, 5)), False)]),
        # An unknown critical entry extension is ignored, as asn1crypto does.
        (13, NOW, [(x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                               b"\x05\x00"), True)]),
        (14, datetime(2051, 6, 1, tzinfo=UTC), []),  # GeneralizedTime
    ]
    der = make_crl(entries, number=None)
    fast = certparse._entries_fast(der)
    assert fast is not None and fast == reference(der)
    assert [e.reason for e in fast] == [RevocationReason.CERTIFICATE_HOLD,
                                        RevocationReason.REMOVE_FROM_CRL,
                                        RevocationReason.KEY_COMPROMISE, None, None]
    assert fast[4].revoked_at == datetime(2051, 6, 1, tzinfo=UTC)


def test_empty_crl() -> None:
    assert check_same(make_crl([])) == []


def test_large_crl() -> None:
    flags = [None, *x509.ReasonFlags]
    entries: list[tuple[int, datetime, list[Ext]]] = []
    for i in range(30_000):
        f = flags[i % len(flags)]
        exts: list[Ext] = [] if f is None else [(x509.CRLReason(f), False)]
        entries.append((0x1000_0000 + i * 7919, NOW - timedelta(seconds=i), exts))
    assert len(check_same(make_crl(entries))) == 30_000


def test_refused_by_cryptography_reads_as_before() -> None:
    """Reason code 7 and a duplicated reason: the reference parser decides, as before."""
    code7 = make_crl([(1, NOW, [(x509.UnrecognizedExtension(REASON_OID, b"\x0a\x01\x07"), False)])])
    assert certparse._entries_fast(code7) is None
    with pytest.raises(ParseError):
        crl_input(code7, CaId(1))
    with pytest.raises(ParseError):
        reference_or_error(code7)

    # A bad reason encoding (BOOLEAN instead of ENUMERATED).
    bad = make_crl([(1, NOW, [(x509.UnrecognizedExtension(REASON_OID, b"\x01\x01\xff"), False)])])
    assert certparse._entries_fast(bad) is None
    try:
        expected: object = reference(bad)
    except (ValueError, TypeError, KeyError, OverflowError):
        expected = ParseError
    if expected is ParseError:
        with pytest.raises(ParseError):
            crl_input(bad, CaId(1))
    else:
        assert list(crl_input(bad, CaId(1)).entries) == expected


def reference_or_error(der: bytes) -> list[RevokedEntry]:
    try:
        return reference(der)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ParseError(str(exc)) from exc

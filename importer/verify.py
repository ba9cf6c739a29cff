"""Trust: every object must be signed by a configured CA (the trust anchors).

Strategy: a ``Verifier`` is pure (runs in the worker processes). For a certificate it looks
only at the anchors whose subject is byte-for-byte the certificate's issuer and checks the
signature with that CA's key directly over the TBSCertificate bytes (ECDSA, RSA PKCS#1 v1.5,
EdDSA; any other algorithm goes through ``verify_directly_issued_by``); when none of those
verifies, every anchor is tried the reference way (issuer names that are equal but encoded
differently). Then the certificate is read into the store's ``CertInput`` (``importer.parse``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID as Sig

from importer.parse import fast_cert_row, tbs_of, tbs_parts
from store.certparse import ParseError, crl_input
from store.model import CaId, CrlInput
from store.writer import CertRow

_ECDSA = {Sig.ECDSA_WITH_SHA256: hashes.SHA256, Sig.ECDSA_WITH_SHA384: hashes.SHA384,
          Sig.ECDSA_WITH_SHA512: hashes.SHA512, Sig.ECDSA_WITH_SHA224: hashes.SHA224}
_PKCS1 = {Sig.RSA_WITH_SHA256: hashes.SHA256, Sig.RSA_WITH_SHA384: hashes.SHA384,
          Sig.RSA_WITH_SHA512: hashes.SHA512, Sig.RSA_WITH_SHA224: hashes.SHA224}


@dataclass(frozen=True)
class Anchor:
    """A configured CA: the importer's trust anchor."""

    name: str
    ca_id: CaId
    der: bytes


class Verified(NamedTuple):
    """One object after verification: what to write, or why not (``error``). A tuple, so
    that the workers' results pickle small."""

    kind: str  # cert | ca | crl | bad
    cert: CertRow | None = None  # for "ca": the CA certificate as its issuer's certificate
    crl: CrlInput | None = None
    ca_name: str | None = None
    ca_der: bytes | None = None
    error: str | None = None


def names_and_key(tbs: bytes) -> tuple[bytes, bytes, bytes]:
    """(issuer Name, subject Name, SubjectPublicKeyInfo) of a TBSCertificate, as DER."""
    i0, i1, s0, s1, k0, k1, _ = tbs_parts(tbs)
    return tbs[i0:i1], tbs[s0:s1], tbs[k0:k1]


def _describe(cert: x509.Certificate) -> str:
    try:
        subject = cert.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        subject = "(unreadable subject)"
    return f"certificate {subject} serial 0x{cert.serial_number:X}"


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class _Ca:
    """An anchor with what checking its signatures needs, computed once."""

    def __init__(self, anchor: Anchor) -> None:
        self.anchor = anchor
        self.cert = x509.load_der_x509_certificate(anchor.der)
        self.key: Any = self.cert.public_key()
        _, self.subject_der, self.spki_der = names_and_key(self.cert.tbs_certificate_bytes)
        # signature algorithm -> the arguments of key.verify after (signature, data), made once
        key = self.key
        self._args: dict[Any, tuple[Any, ...]] = {}
        if isinstance(key, ec.EllipticCurvePublicKey):
            self._args = {oid: (ec.ECDSA(h()),) for oid, h in _ECDSA.items()}
        elif isinstance(key, rsa.RSAPublicKey):
            self._args = {oid: (padding.PKCS1v15(), h()) for oid, h in _PKCS1.items()}
        elif isinstance(key, ed25519.Ed25519PublicKey):
            self._args = {Sig.ED25519: ()}
        elif isinstance(key, ed448.Ed448PublicKey):
            self._args = {Sig.ED448: ()}

    def signed(self, cert: x509.Certificate, tbs: bytes) -> bool:
        """Did this CA sign cert? (Its issuer name is this CA's subject, byte for byte.)"""
        try:
            args = self._args.get(cert.signature_algorithm_oid)
            if args is not None:
                self.key.verify(cert.signature, tbs, *args)
            else:
                cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def issued(self, cert: x509.Certificate) -> bool:
        """The reference check (names compared as ``cryptography`` compares them)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


class Verifier:
    """Checks certificates and CRLs against the anchors (pure: runs in worker processes)."""

    def __init__(self, anchors: Sequence[Anchor]) -> None:
        self.anchors = list(anchors)
        self._cas = [_Ca(a) for a in self.anchors]
        self._by_subject: dict[bytes, list[_Ca]] = {}
        for ca in self._cas:
            self._by_subject.setdefault(ca.subject_der, []).append(ca)
        self._names = ", ".join(a.name for a in self.anchors)

    def issuer_of(self, cert: x509.Certificate) -> Anchor | None:
        """The configured CA whose key verifies cert's signature (issuer name must match)."""
        tbs = cert.tbs_certificate_bytes
        try:
            issuer_der = names_and_key(tbs)[0]
        except Exception:  # noqa: BLE001 - the reference decides below
            issuer_der = b""
        return self._issuer(cert, tbs, issuer_der)

    def _issuer(self, cert: x509.Certificate, tbs: bytes, issuer_der: bytes) -> Anchor | None:
        tried = self._by_subject.get(issuer_der, ())
        for ca in tried:
            if ca.signed(cert, tbs):
                return ca.anchor
        for ca in self._cas:
            if ca not in tried and ca.issued(cert):
                return ca.anchor
        return None

    def check(self, kind: str, der: bytes) -> Verified:
        """Verify one object; never raises (a poison file must not stall the spool)."""
        try:
            return self._cert(der) if kind == "cert" else self._crl(der)
        except Exception as exc:  # noqa: BLE001 - reported as the file's rejection reason
            return Verified("bad", error=f"an object that could not be verified ({exc!r})")

    def _cert(self, der: bytes) -> Verified:
        try:
            cert = x509.load_der_x509_certificate(der)
            key = cert.public_key()
        except ValueError as exc:
            return Verified("bad", error=f"a certificate that cannot be parsed ({exc})")
        except Exception as exc:  # noqa: BLE001 - an unsupported key type: this file's problem
            return Verified("bad", error=f"a certificate with an unusable key ({exc})")
        try:
            tbs = tbs_of(der)  # the bytes signed (cryptography's copy is re-encoded: slower)
            issuer_der, subject_der, spki_der = names_and_key(tbs)
        except Exception:  # noqa: BLE001 - then compare every CA the reference way
            tbs = cert.tbs_certificate_bytes
            issuer_der, subject_der, spki_der = b"", None, None
        issuer = self._issuer(cert, tbs, issuer_der)
        for ca in self._cas:
            if subject_der is not None and ca.subject_der != subject_der \
                    and ca.spki_der != spki_der:
                continue  # neither the CA's name nor its key, byte for byte
            if key == ca.key and cert.subject == ca.cert.subject:
                return self._ca_cert(cert, der, ca.anchor, issuer)
        if issuer is None:
            return Verified("bad", error=f"{_describe(cert)} is not signed by any configured CA"
                            f" ({self._names})")
        inp = self._input(cert, der, issuer, tbs)
        return inp if isinstance(inp, Verified) else Verified("cert", cert=inp)

    def _ca_cert(self, cert: x509.Certificate, der: bytes, anchor: Anchor,
                 issuer: Anchor | None) -> Verified:
        """The configured CA itself, perhaps re-issued: it updates that CA's record."""
        if issuer is None and not _self_signed(cert):
            return Verified("bad", error=f"{_describe(cert)} matches CA {anchor.name} but"
                            f" is signed neither by itself nor by a configured CA"
                            f" ({self._names})")
        as_issued: CertRow | None = None
        if issuer is not None and issuer.name != anchor.name:
            inp = self._input(cert, der, issuer)
            if isinstance(inp, Verified):
                return inp
            as_issued = inp
        return Verified("ca", cert=as_issued, ca_name=anchor.name, ca_der=der)

    @staticmethod
    def _input(cert: x509.Certificate, der: bytes, issuer: Anchor,
               tbs: bytes | None = None) -> CertRow | Verified:
        try:
            return fast_cert_row(cert, der, issuer.ca_id, tbs)
        except ParseError as exc:
            return Verified("bad", error=f"a certificate of {issuer.name} that cannot be read"
                            f" ({exc})")

    def _crl(self, der: bytes) -> Verified:
        try:
            crl = x509.load_der_x509_crl(der)
            issuer = crl.issuer
        except ValueError as exc:
            return Verified("bad", error=f"a CRL that cannot be parsed ({exc})")
        for ca in self._cas:
            try:
                valid = issuer == ca.cert.subject and crl.is_signature_valid(ca.key)
            except (ValueError, TypeError):
                valid = False
            if valid:
                try:
                    parsed = crl_input(der, ca.anchor.ca_id)
                except ParseError as exc:
                    return Verified("bad", error=f"a CRL of {ca.anchor.name} that cannot be"
                                    f" read ({exc})")
                if parsed.indirect:
                    return Verified("bad", error=f"an indirect CRL of {ca.anchor.name} (its"
                                    " issuing distribution point says indirectCRL): certpub"
                                    " does not read the certificateIssuer entry extension"
                                    " (RFC 5280 §5.3.3), so it cannot tell whose"
                                    " certificates it revokes; refused")
                return Verified("crl", crl=parsed)
        try:
            who = issuer.rfc4514_string()
        except ValueError:
            who = "(unreadable issuer)"
        return Verified("bad", error=f"CRL issued by {who or '(empty name)'} is not signed by any"
                        f" configured CA ({self._names})")

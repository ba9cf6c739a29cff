"""Signed OCSP requests (RFC 6960 §4.1.2): check who signed, before anything is answered.

Strategy: ``RequestorCheck.check(request, now, store)`` is pure apart from two indexed store
reads; it returns quietly or raises the ``OcspError`` whose status the client gets. Modes
(``[http] request_signatures``):

- ``ignore`` (the default): signatures are neither required nor checked.
- ``verify``: an unsigned request is answered; a signed one only if its signature verifies
  with the first certificate of ``optionalSignature.certs`` and that certificate was issued by
  a configured CA (its signature checked with the CA's key), is valid now, allows
  digitalSignature when it has a keyUsage, is not revoked in the store, and — when the
  request names its requestor — is the certificate of that name.
- ``require``: like ``verify``, and an unsigned request gets ``sigRequired``.

A requestor that fails any of these gets ``unauthorized`` (RFC 6960 §2.3: "the client is not
authorized to make this query to the server"): the request itself is well-formed, the
server just will not answer this requestor. Structure that cannot be read (a certificate
that does not parse, broken algorithm parameters) is ``malformedRequest``. The exception
message is the reason the adapter logs; it names certificates by serial and never carries
the request bytes.

requestorName (RFC 6960 §4.1.2: a signer "SHALL specify its name"): when present it must be
the certificate's subject (a directoryName, compared as RFC 5280 §7.1 says) or one of its
subjectAltNames; when absent the request is still accepted, because the certificate and the
signature, not the name, are what authenticate it.

Accepted signatures: RSA PKCS#1 v1.5 and RSASSA-PSS (RSA keys of 2048 bits or more), ECDSA,
Ed25519, each with SHA-256, SHA-384 or SHA-512 (Ed25519: its own hash). SHA-1 and MD5
signatures are refused: a forged request would be accepted as coming from its requestor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from server.ocsp.codec import (
    MalformedRequest,
    OcspRequest,
    RequestSignature,
    SigRequired,
    TryLater,
    Unauthorized,
)
from server.ocsp.responder import StatusStore
from store.model import CertStatus
from store.errors import StoreError

MODES = ("ignore", "verify", "require")
MIN_RSA_BITS = 2048
# Which configured CA issued a requestor certificate depends on its bytes only: remembered
# (bounded), so a requestor that signs every request costs one signature check, not two.
ISSUER_MEMO_ENTRIES = 1024

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


class _TrustedCa:
    """A configured CA as requestor certificates are checked against it."""

    def __init__(self, name: str, der: bytes) -> None:
        self.name = name
        self.cert = x509.load_der_x509_certificate(der)
        parsed = asn1_x509.Certificate.load(der)
        self.name_hash = hashlib.sha1(parsed.subject.dump()).digest()
        self.key_hash = hashlib.sha1(parsed.public_key["public_key"].contents[1:]).digest()


class RequestorCheck:
    """The ``[http] request_signatures`` policy over the configured CAs (RFC 6960 §4.1.2)."""

    def __init__(self, mode: str, ca_certificates: Mapping[str, bytes]) -> None:
        if mode not in MODES:
            raise ValueError(f"request_signatures must be one of {MODES}; got {mode!r}")
        self.mode = mode
        self._cas = [_TrustedCa(name, der) for name, der in ca_certificates.items()]
        self._issuers: dict[bytes, _TrustedCa | None] = {}

    @property
    def active(self) -> bool:
        """Whether signatures are checked (then a signed request is never answered unchecked)."""
        return self.mode != "ignore"

    def check(self, request: OcspRequest, now: datetime, store: StatusStore) -> None:
        """Raise SigRequired, Unauthorized, MalformedRequest or TryLater; else return."""
        if self.mode == "ignore":
            return
        sig = request.signature
        if sig is None:
            if self.mode == "require":
                raise SigRequired("request signatures are required; the request is unsigned")
            return
        if not sig.certs:
            raise Unauthorized("request signature: no requestor certificate in the request")
        try:
            cert = x509.load_der_x509_certificate(sig.certs[0])
            serial = f"{cert.serial_number:#x}"
            who = f"requestor certificate serial {serial[:42]}"  # the log line stays short
            usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(
                x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        except ValueError as exc:  # cryptography parses lazily: extensions fail here
            raise MalformedRequest("request signature: the requestor certificate does not"
                                   " parse") from exc
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise Unauthorized(f"request signature: {who} has a key of an unsupported"
                               " type") from None
        _verify(key, sig, who)
        ca = self._issuer(sig.certs[0], cert)
        if ca is None:
            raise Unauthorized(f"request signature: {who} was not issued by a configured CA")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Unauthorized(
                f"request signature: {who} is not valid now (valid"
                f" {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to"
                f" {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
        if usage is not None and not usage.digital_signature:
            raise Unauthorized(f"request signature: {who} does not allow digitalSignature")
        if request.requestor_name is not None and not _names(request.requestor_name,
                                                             sig.certs[0]):
            raise Unauthorized(f"request signature: requestorName is not the subject of {who}")
        try:
            record = store.ca_by_issuer_hash("sha1", ca.name_hash, ca.key_hash)
            row = None if record is None else store.cert(record.id, cert.serial_number)
        except StoreError as exc:
            raise TryLater(str(exc)) from exc
        if row is not None and row.status is CertStatus.REVOKED:
            raise Unauthorized(f"request signature: {who} is revoked")

    def _issuer(self, der: bytes, cert: x509.Certificate) -> _TrustedCa | None:
        if der in self._issuers:
            return self._issuers[der]
        found = None
        for ca in self._cas:
            if cert.issuer != ca.cert.subject:
                continue
            try:
                cert.verify_directly_issued_by(ca.cert)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                continue
            found = ca
            break
        if len(self._issuers) >= ISSUER_MEMO_ENTRIES:
            self._issuers.clear()
        self._issuers[der] = found
        return found


def _verify(key: Any, sig: RequestSignature, who: str) -> None:
    """Check the signature over the DER tbsRequest; raise Unauthorized or MalformedRequest."""
    try:
        alg = algos.SignedDigestAlgorithm.load(sig.algorithm_der, strict=True)
        _ = alg.native  # forces the lazy parse of the parameters
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, KeyError, ...
        raise MalformedRequest("request signature: unreadable signature algorithm") from exc
    try:
        kind = alg.signature_algo
        hash_name = alg.hash_algo
    except ValueError:  # an algorithm asn1crypto does not know: certainly not one accepted
        raise Unauthorized(f"request signature: algorithm {alg['algorithm'].dotted} is not"
                           " accepted") from None
    try:
        pss = None
        if kind == "rsassa_pss":
            params = alg["parameters"]
            mgf = params["mask_gen_algorithm"]
            if mgf["algorithm"].native != "mgf1" or params["trailer_field"].native != \
                    "trailer_field_bc":
                raise Unauthorized("request signature: unsupported RSASSA-PSS parameters")
            pss = (str(mgf["parameters"]["algorithm"].native), int(params["salt_length"].native))
    except Unauthorized:
        raise
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, KeyError, ...
        raise MalformedRequest("request signature: unreadable signature algorithm") from exc
    if kind == "ed25519":
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise Unauthorized(f"request signature: Ed25519 signature, but {who} has another key")
        try:
            key.verify(sig.signature, sig.tbs_der)
        except InvalidSignature:
            raise Unauthorized(f"request signature does not verify with {who}") from None
        return
    hash_type = _HASHES.get(hash_name)
    if hash_type is None or (pss is not None and pss[0] not in _HASHES):
        raise Unauthorized(f"request signature: {kind} with {hash_name} is not accepted")
    try:
        if kind == "rsassa_pkcs1v15" or kind == "rsassa_pss":
            if not isinstance(key, rsa.RSAPublicKey):
                raise Unauthorized(f"request signature: RSA signature, but {who} has another key")
            if key.key_size < MIN_RSA_BITS:
                raise Unauthorized(f"request signature: {who} has an RSA key under"
                                   f" {MIN_RSA_BITS} bits")
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            if pss is not None:
                pad = padding.PSS(padding.MGF1(_HASHES[pss[0]]()), pss[1])
            key.verify(sig.signature, sig.tbs_der, pad, hash_type())
        elif kind == "ecdsa":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise Unauthorized(f"request signature: ECDSA signature, but {who} has another key")
            key.verify(sig.signature, sig.tbs_der, ec.ECDSA(hash_type()))
        else:
            raise Unauthorized(f"request signature: {kind} signatures are not accepted")
    except (InvalidSignature, ValueError):  # ValueError: e.g. a PSS salt length out of range
        raise Unauthorized(f"request signature does not verify with {who}") from None


def _names(requestor_name: bytes, cert_der: bytes) -> bool:
    """Whether requestorName (a GeneralName) names this certificate."""
    try:
        name = asn1_x509.GeneralName.load(requestor_name)
        cert = asn1_x509.Certificate.load(cert_der)
        if name.name == "directory_name":
            return bool(name.chosen == cert.subject)
        alt = cert.subject_alt_name_value
        return alt is not None and any(
            n.name == name.name and n.native == name.native for n in alt)
    except Exception as exc:  # the codec parsed both; a deeper failure is still malformed
        raise MalformedRequest("request signature: unreadable requestorName") from exc

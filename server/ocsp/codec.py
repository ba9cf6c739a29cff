"""OCSP messages: DER request in, typed request out; typed answer in, DER response out.

Strategy: pure functions over asn1crypto (no Twisted, no store, no clock, no logging).
asn1crypto parses lazily, so ``decode_request`` loads with ``strict=True`` and copies every
field it needs into frozen dataclasses inside one ``try``: any parse error, however deep,
becomes ``MalformedRequest`` and never escapes as something else. Responses are built from
asn1crypto values; the signature is computed by a callable the caller hands in (see
``server.ocsp.signer``), so this module never touches a key.

RFC 6960 (OCSP), RFC 5019/9919 (lightweight profile), RFC 9654 (nonce).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Literal

from asn1crypto import core, ocsp

# RFC 9654 §2.1: Nonce ::= OCTET STRING(SIZE(1..128)). RFC 8954 had capped it at 32 octets;
# RFC 9654 raised the cap because some environments derive longer nonces, so a responder
# that still refused 33..128 octets would turn away requesters written to the current RFC.
# Anything outside 1..128 is malformedRequest (RFC 9654 §2.1 lets a responder reject it).
MIN_NONCE_OCTETS = 1
MAX_NONCE_OCTETS = 128
DEFAULT_MAX_CERTIDS = 100

OID_NONCE = "1.3.6.1.5.5.7.48.1.2"
OID_EXTENDED_REVOKE = "1.3.6.1.5.5.7.48.1.9"
# RFC 6960 §2.2: the status given to a serial that was never issued in "revoked" mode.
EXTENDED_REVOKE_TIME = datetime(1970, 1, 1, tzinfo=UTC)

StatusName = Literal["good", "revoked", "unknown"]


# --- errors --------------------------------------------------------------------------------


class OcspError(Exception):
    """An OCSP failure that is answered with an unsigned OCSPResponse of ``status``."""

    status: ClassVar[str] = "internal_error"


class MalformedRequest(OcspError):
    """The request is not a DER OCSPRequest this responder accepts (RFC 6960 §2.3)."""

    status = "malformed_request"


class InternalError(OcspError):
    """A bug; the adapter logs the traceback."""

    status = "internal_error"


class TryLater(OcspError):
    """The store cannot be read now."""

    status = "try_later"


class SigRequired(OcspError):
    """The request must be signed."""

    status = "sign_required"


class Unauthorized(OcspError):
    """No CertID names a served issuer, or a signed request's requestor is not accepted."""

    status = "unauthorized"


ERROR_STATUSES = ("malformed_request", "internal_error", "try_later", "sign_required",
                  "unauthorized")


# --- the request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertId:
    """One CertID of a request (RFC 6960 §4.1.1), with its DER to echo in the answer."""

    hash_algorithm: str  # "sha1", "sha256", "sha384", "sha512", or a dotted OID
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int
    der: bytes

    @property
    def key(self) -> tuple[str, bytes, bytes, int]:
        """What identifies the certificate asked about, whatever the DER spelling."""
        return (self.hash_algorithm, self.issuer_name_hash, self.issuer_key_hash, self.serial)


@dataclass(frozen=True)
class Extension:
    """A request extension other than the nonce: kept, reported, otherwise ignored."""

    oid: str
    critical: bool
    value: bytes  # the extnValue octets


@dataclass(frozen=True)
class RequestSignature:
    """The optionalSignature of a signed request (RFC 6960 §4.1.2), not verified here."""

    algorithm: str
    signature: bytes
    tbs_der: bytes  # the signed TBSRequest
    certs: tuple[bytes, ...]
    algorithm_der: bytes = b""  # the AlgorithmIdentifier, parameters included (RSASSA-PSS)


@dataclass(frozen=True)
class OcspRequest:
    """A decoded OCSPRequest."""

    cert_ids: tuple[CertId, ...]
    nonce: bytes | None  # the nonce octets (RFC 9654), None without the extension
    signature: RequestSignature | None
    extensions: tuple[Extension, ...]
    requestor_name: bytes | None  # DER of the GeneralName

    @property
    def signed(self) -> bool:
        return self.signature is not None


def decode_request(der: bytes, *, max_certids: int = DEFAULT_MAX_CERTIDS) -> OcspRequest:
    """Parse a DER OCSPRequest strictly (RFC 6960 §4.1.1); raise MalformedRequest."""
    if not der:
        raise MalformedRequest("empty request")
    try:
        req = ocsp.OCSPRequest.load(der, strict=True)
        tbs = req["tbs_request"]
        if tbs["version"].native != "v1":
            raise MalformedRequest(f"unsupported version {tbs['version'].native!r}")
        requests = tbs["request_list"]
        if len(requests) == 0:
            raise MalformedRequest("requestList is empty")
        if len(requests) > max_certids:
            raise MalformedRequest(f"{len(requests)} CertIDs; at most {max_certids} accepted")
        cert_ids = []
        for one in requests:
            cid = one["req_cert"]
            alg = cid["hash_algorithm"]["algorithm"]
            cert_ids.append(CertId(
                hash_algorithm=str(alg.native),
                issuer_name_hash=bytes(cid["issuer_name_hash"].native),
                issuer_key_hash=bytes(cid["issuer_key_hash"].native),
                serial=int(cid["serial_number"].native),
                der=cid.dump(),
            ))
            _ = one["single_request_extensions"].native  # parsed only to reject bad DER
        requestor = tbs["requestor_name"]
        requestor_der = None
        if not isinstance(requestor, core.Void):
            _ = requestor.native  # forces the lazy parse inside this try
            requestor_der = requestor.untag().dump()  # without the [1] of TBSRequest
        nonce: bytes | None = None
        extensions: list[Extension] = []
        seen: set[str] = set()
        for ext in tbs["request_extensions"] if tbs["request_extensions"].native else ():
            oid = ext["extn_id"].dotted
            if oid in seen:
                raise MalformedRequest(f"extension {oid} appears twice")  # RFC 5280 §4.2
            seen.add(oid)
            if oid == OID_NONCE:
                # Strict: the value must be exactly one DER OCTET STRING (RFC 9654 §2.1).
                inner = core.OctetString.load(bytes(ext["extn_value"].contents), strict=True)
                nonce = bytes(inner.native)
                if not MIN_NONCE_OCTETS <= len(nonce) <= MAX_NONCE_OCTETS:
                    raise MalformedRequest(
                        f"nonce of {len(nonce)} octets; {MIN_NONCE_OCTETS}..{MAX_NONCE_OCTETS}"
                        " accepted (RFC 9654)")
            else:
                extensions.append(Extension(oid, bool(ext["critical"].native),
                                            bytes(ext["extn_value"].contents)))
        signature = None
        sig = req["optional_signature"]
        if not isinstance(sig, core.Void):
            certs = sig["certs"]
            signature = RequestSignature(
                algorithm=str(sig["signature_algorithm"]["algorithm"].native),
                signature=bytes(sig["signature"].native),
                tbs_der=tbs.dump(),
                certs=tuple(c.dump() for c in certs) if certs.native is not None else (),
                algorithm_der=sig["signature_algorithm"].dump(),
            )
            for c in certs if certs.native is not None else ():
                _ = c.native
    except OcspError:
        raise
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, KeyError, ...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise MalformedRequest(
            f"not a DER OCSPRequest: {type(exc).__name__}: {first_line}") from exc
    return OcspRequest(
        cert_ids=tuple(cert_ids),
        nonce=nonce,
        signature=signature,
        extensions=tuple(extensions),
        requestor_name=requestor_der,
    )


# --- the response --------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleAnswer:
    """The status of one CertID as it goes into a SingleResponse (RFC 6960 §4.2.1)."""

    cert_id: CertId
    status: StatusName
    this_update: datetime
    next_update: datetime
    revoked_at: datetime | None = None
    reason: str | None = None  # asn1crypto CRLReason name; None: no reason code
    archive_cutoff: datetime | None = None


@dataclass(frozen=True)
class ResponderId:
    """byKey (SHA-1 of the signer's subjectPublicKey bits) or byName (its subject DER)."""

    by_key: bytes | None = None
    by_name: bytes | None = None

    def asn1(self) -> ocsp.ResponderId:
        if self.by_key is not None:
            return ocsp.ResponderId(name="by_key", value=core.OctetString(self.by_key))
        if self.by_name is None:
            raise ValueError("a ResponderId needs by_key or by_name")
        from asn1crypto import x509 as asn1_x509

        return ocsp.ResponderId(name="by_name", value=asn1_x509.Name.load(self.by_name))


def key_hash(subject_public_key_info_der: bytes) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING value (RFC 6960 §4.2.1 KeyHash)."""
    from asn1crypto import keys

    spki = keys.PublicKeyInfo.load(subject_public_key_info_der)
    bits = spki["public_key"]
    return hashlib.sha1(bits.contents[1:]).digest()  # skip the unused-bits octet


def _time(value: datetime) -> core.GeneralizedTime:
    # RFC 5019 §2.2.4: GMT, with seconds, no fractional seconds.
    return core.GeneralizedTime(value.astimezone(UTC).replace(microsecond=0))


def _single(answer: SingleAnswer) -> ocsp.SingleResponse:
    if answer.status == "good":
        status = ocsp.CertStatus(name="good", value=ocsp.StatusGood())
    elif answer.status == "unknown":
        status = ocsp.CertStatus(name="unknown", value=ocsp.StatusUnknown())
    else:
        if answer.revoked_at is None:
            raise ValueError("a revoked answer needs revoked_at")
        info: dict[str, object] = {"revocation_time": _time(answer.revoked_at)}
        if answer.reason is not None:
            info["revocation_reason"] = answer.reason
        status = ocsp.CertStatus(name="revoked", value=ocsp.RevokedInfo(info))
    fields: dict[str, object] = {
        "cert_id": ocsp.CertId.load(answer.cert_id.der),
        "cert_status": status,
        "this_update": _time(answer.this_update),
        "next_update": _time(answer.next_update),
    }
    if answer.archive_cutoff is not None:
        fields["single_extensions"] = [{
            "extn_id": "archive_cutoff",
            "critical": False,
            "extn_value": _time(answer.archive_cutoff),
        }]
    return ocsp.SingleResponse(fields)


def encode_response_data(
    responder_id: ResponderId,
    produced_at: datetime,
    answers: Sequence[SingleAnswer],
    *,
    nonce: bytes | None = None,
    extended_revoke: bool = False,
) -> ocsp.ResponseData:
    """The tbsResponseData (RFC 6960 §4.2.1) of a response."""
    if not answers:
        raise ValueError("a response needs at least one SingleResponse")
    exts: list[dict[str, object]] = []
    if nonce is not None:
        exts.append({"extn_id": "nonce", "critical": False,
                     "extn_value": core.OctetString(nonce)})
    if extended_revoke:  # RFC 6960 §4.4.8: non-critical, value NULL
        exts.append({"extn_id": "extended_revoke", "critical": False,
                     "extn_value": core.Null()})
    data: dict[str, object] = {
        "version": "v1",
        "responder_id": responder_id.asn1(),
        "produced_at": _time(produced_at),
        "responses": [_single(a) for a in answers],
    }
    if exts:
        data["response_extensions"] = exts
    return ocsp.ResponseData(data)


# --- ResponseData as DER, built from bytes (the signing hot path) ---------------------------
#
# asn1crypto builds the same bytes (encode_response_data, kept as the reference that
# tests.ocsp.test_codec compares with) at ~10x the cost: a nonce answer is signed per request.

_OID_NONCE = bytes.fromhex("06092b0601050507300102")  # id-pkix-ocsp-nonce
_OID_ARCHIVE_CUTOFF = bytes.fromhex("06092b0601050507300106")  # id-pkix-ocsp-archive-cutoff
_OID_EXTENDED_REVOKE = bytes.fromhex("06092b0601050507300109")  # id-pkix-ocsp-extended-revoke


def _reason_codes() -> dict[str, int]:
    from asn1crypto import crl

    return {name: code for code, name in crl.CRLReason._map.items()}


_REASON_CODES = _reason_codes()


_gtimes: dict[datetime, bytes] = {}  # a CA's thisUpdate/nextUpdate repeat in every answer


def _gtime(value: datetime) -> bytes:
    """GeneralizedTime, GMT, whole seconds (RFC 5019 §2.2.4)."""
    found = _gtimes.get(value)
    if found is None:
        if len(_gtimes) >= 4096:
            _gtimes.clear()
        found = _gtimes[value] = (b"\x18\x0f" + value.astimezone(UTC).strftime(
            "%Y%m%d%H%M%SZ").encode("ascii"))
    return found


def _extension(oid: bytes, value_der: bytes) -> bytes:
    """A non-critical Extension (critical DEFAULT FALSE is omitted in DER)."""
    return _tlv(0x30, oid + _tlv(0x04, value_der))


def _single_der(answer: SingleAnswer) -> bytes:
    if answer.status == "good":
        status = b"\x80\x00"
    elif answer.status == "unknown":
        status = b"\x82\x00"
    else:
        if answer.revoked_at is None:
            raise ValueError("a revoked answer needs revoked_at")
        info = _gtime(answer.revoked_at)
        if answer.reason is not None:
            info += b"\xa0\x03\x0a\x01" + bytes((_REASON_CODES[answer.reason],))
        status = _tlv(0xA1, info)
    body = (answer.cert_id.der + status + _gtime(answer.this_update)
            + _tlv(0xA0, _gtime(answer.next_update)))
    if answer.archive_cutoff is not None:
        body += _tlv(0xA1, _tlv(0x30, _extension(_OID_ARCHIVE_CUTOFF,
                                                 _gtime(answer.archive_cutoff))))
    return _tlv(0x30, body)


def encode_response_data_der(
    responder_id: ResponderId,
    produced_at: datetime,
    answers: Sequence[SingleAnswer],
    *,
    nonce: bytes | None = None,
    extended_revoke: bool = False,
) -> bytes:
    """The DER of ``encode_response_data`` (same arguments, same bytes)."""
    return response_data_der(responder_id_der(responder_id), _gtime(produced_at),
                             encode_responses_der(answers), nonce=nonce,
                             extended_revoke=extended_revoke)


def responder_id_der(responder_id: ResponderId) -> bytes:
    """The ResponderID CHOICE as it sits in a ResponseData (byName [1], byKey [2])."""
    if responder_id.by_key is not None:
        return _tlv(0xA2, _tlv(0x04, responder_id.by_key))
    if responder_id.by_name is not None:
        return _tlv(0xA1, responder_id.by_name)
    raise ValueError("a ResponderId needs by_key or by_name")


def encode_responses_der(answers: Sequence[SingleAnswer]) -> bytes:
    """The ``responses`` SEQUENCE OF SingleResponse of a ResponseData: what a cached answer
    keeps so that a nonce request for the same CertIDs is answered by one signature."""
    if not answers:
        raise ValueError("a response needs at least one SingleResponse")
    return _tlv(0x30, b"".join(_single_der(a) for a in answers))


def produced_at_der(seconds: int) -> bytes:
    """GeneralizedTime of a POSIX time in whole seconds (producedAt of a signed answer)."""
    return _gtime(datetime.fromtimestamp(seconds, UTC))


def plain_request_der(cert_id_ders: Sequence[bytes]) -> bytes:
    """The smallest OCSPRequest for these CertIDs: no nonce, no extension, unsigned (what
    ``openssl ocsp -no_nonce`` sends); the request a nonce answer's CertIDs are kept under."""
    return _tlv(0x30, _tlv(0x30, _tlv(0x30, b"".join(_tlv(0x30, c) for c in cert_id_ders))))


def response_data_der(rid_der: bytes, produced_at_gt: bytes, responses_der: bytes, *,
                      nonce: bytes | None = None, extended_revoke: bool = False) -> bytes:
    """A ResponseData from its pre-encoded parts (``responder_id_der``, a GeneralizedTime,
    ``encode_responses_der``) and the response extensions."""
    body = rid_der + produced_at_gt + responses_der
    exts = b""
    if nonce is not None:
        exts += _extension(_OID_NONCE, _tlv(0x04, nonce))
    if extended_revoke:  # RFC 6960 §4.4.8: non-critical, value NULL
        exts += _extension(_OID_EXTENDED_REVOKE, b"\x05\x00")
    if exts:
        body += _tlv(0xA1, _tlv(0x30, exts))
    return _tlv(0x30, body)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def _tlv(tag: int, contents: bytes) -> bytes:
    return bytes((tag,)) + _der_len(len(contents)) + contents


_OID_BASIC = bytes.fromhex("06092b0601050507300101")  # id-pkix-ocsp-basic


def encode_response(
    data: ocsp.ResponseData,
    sign: Callable[[bytes], bytes],
    signature_algorithm_der: bytes,
    certs: Sequence[bytes] = (),
) -> bytes:
    """A successful OCSPResponse with a signed BasicOCSPResponse (RFC 6960 §4.2.1).

    The envelope is DER spliced from bytes (the signed data, the algorithm and the
    certificates are DER already): byte for byte what asn1crypto builds, without re-parsing
    the certificates on every signature (tests.ocsp.test_codec compares both)."""
    return encode_response_der(data.dump(), sign, signature_algorithm_der, certs)


def encode_response_der(tbs_der: bytes, sign: Callable[[bytes], bytes],
                        signature_algorithm_der: bytes, certs: Sequence[bytes] = ()) -> bytes:
    """``encode_response`` from the DER tbsResponseData."""
    basic = tbs_der + signature_algorithm_der + _tlv(0x03, b"\x00" + sign(tbs_der))
    if certs:
        basic += _tlv(0xA0, _tlv(0x30, b"".join(certs)))
    response_bytes = _tlv(0x30, _OID_BASIC + _tlv(0x04, _tlv(0x30, basic)))
    return _tlv(0x30, b"\x0a\x01\x00" + _tlv(0xA0, response_bytes))


def encode_response_asn1(
    data: ocsp.ResponseData,
    sign: Callable[[bytes], bytes],
    signature_algorithm_der: bytes,
    certs: Sequence[bytes] = (),
) -> bytes:
    """The same response built by asn1crypto (the reference ``encode_response`` must match)."""
    from asn1crypto import algos
    from asn1crypto import x509 as asn1_x509

    tbs_der = data.dump()
    basic: dict[str, object] = {
        "tbs_response_data": data,
        "signature_algorithm": algos.SignedDigestAlgorithm.load(signature_algorithm_der),
        "signature": sign(tbs_der),
    }
    if certs:
        basic["certs"] = [asn1_x509.Certificate.load(c) for c in certs]
    response = ocsp.OCSPResponse({
        "response_status": "successful",
        "response_bytes": {
            "response_type": "basic_ocsp_response",
            "response": ocsp.BasicOCSPResponse(basic),
        },
    })
    return bytes(response.dump())


_ERROR_RESPONSES = {
    status: bytes(ocsp.OCSPResponse({"response_status": status}).dump())
    for status in ERROR_STATUSES
}


def encode_error(status: str) -> bytes:
    """An unsigned OCSPResponse carrying only an error status (RFC 6960 §2.3)."""
    try:
        return _ERROR_RESPONSES[status]
    except KeyError:
        raise ValueError(f"not an OCSP error status: {status!r}") from None


def error_of(status: str, reason: str) -> OcspError:
    """The OcspError that answers status (an error status), carrying reason."""
    for cls in (MalformedRequest, InternalError, TryLater, SigRequired, Unauthorized):
        if cls.status == status:
            return cls(reason)
    raise ValueError(f"not an OCSP error status: {status!r}")

"""The codec over named DER vectors (tests/vectors/ocsp/README.md) and built responses."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as c_ocsp

from server.ocsp import codec
from server.ocsp.codec import (
    CertId,
    MalformedRequest,
    ResponderId,
    SingleAnswer,
    decode_request,
    encode_error,
    encode_response,
    encode_response_data,
)
from tests.ocsp.helpers import T0, make_ca, parse_response

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ocsp"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def serial_of(name: str) -> int:
    return x509.load_pem_x509_certificate((VECTORS / name).read_bytes()).serial_number


def issuer_hashes(algorithm: str) -> tuple[bytes, bytes]:
    pem = x509.load_pem_x509_certificate((VECTORS / "ca.pem").read_bytes())
    ca = asn1_x509.Certificate.load(pem.public_bytes(serialization.Encoding.DER))
    return (hashlib.new(algorithm, ca.subject.dump()).digest(),
            hashlib.new(algorithm, ca.public_key["public_key"].contents[1:]).digest())


GOOD = [
    # name, algorithm, certificates, nonce length, signed
    ("req-sha1-single.der", "sha1", ["ee1.pem"], None, False),
    ("req-sha256-single.der", "sha256", ["ee1.pem"], None, False),
    ("req-sha384-single.der", "sha384", ["ee1.pem"], None, False),
    ("req-sha512-single.der", "sha512", ["ee1.pem"], None, False),
    ("req-sha1-multi.der", "sha1", ["ee1.pem", "ee2.pem"], None, False),
    ("req-sha1-nonce.der", "sha1", ["ee1.pem"], 16, False),
    ("req-signed.der", "sha1", ["ee1.pem"], None, True),
    ("req-nonce-1.der", "sha1", ["ee1.pem"], 1, False),
    ("req-nonce-128.der", "sha1", ["ee1.pem"], 128, False),
    ("req-100-certids.der", "sha1", ["ee1.pem"] * 100, None, False),
]


@pytest.mark.parametrize(("name", "algorithm", "certs", "nonce", "signed"), GOOD)
def test_good_vectors(name: str, algorithm: str, certs: list[str], nonce: int | None,
                      signed: bool) -> None:
    der = vector(name)
    req = decode_request(der)
    name_hash, key_hash = issuer_hashes(algorithm)
    assert [c.serial for c in req.cert_ids] == [serial_of(c) for c in certs]
    for cid in req.cert_ids:
        assert (cid.hash_algorithm, cid.issuer_name_hash, cid.issuer_key_hash) == (
            algorithm, name_hash, key_hash)
        assert cid.der in der  # the exact bytes to echo
    assert (None if req.nonce is None else len(req.nonce)) == nonce
    assert req.signed is signed
    if signed:
        assert req.signature is not None and req.signature.certs


def test_unissued_serial_vector() -> None:
    assert decode_request(vector("req-unissued-serial.der")).cert_ids[0].serial == 0x7FFFFFFF


BAD = [
    ("bad-not-der.der", "not a DER OCSPRequest"),
    ("bad-truncated.der", "Insufficient data"),
    ("bad-trailing-garbage.der", "trailing data"),
    ("bad-wrong-outer-type.der", "not a DER OCSPRequest"),
    ("bad-empty-request-list.der", "requestList is empty"),
    ("bad-nonce-empty.der", "nonce of 0 octets"),
    ("bad-nonce-129.der", "nonce of 129 octets"),
    ("bad-nonce-not-octet-string.der", "not a DER OCSPRequest"),
    ("req-101-certids.der", "101 CertIDs"),
]


@pytest.mark.parametrize(("name", "message"), BAD)
def test_bad_vectors_are_malformed(name: str, message: str) -> None:
    with pytest.raises(MalformedRequest, match=message) as info:
        decode_request(vector(name))
    assert info.value.status == "malformed_request"
    assert "\n" not in str(info.value)


def test_max_certids_is_configurable() -> None:
    with pytest.raises(MalformedRequest):
        decode_request(vector("req-sha1-multi.der"), max_certids=1)
    assert len(decode_request(vector("req-sha1-multi.der"), max_certids=2).cert_ids) == 2


@pytest.mark.parametrize("cut", [0, 1, 2, 10, 40])
def test_every_prefix_is_malformed_not_a_crash(cut: int) -> None:
    der = vector("req-sha1-nonce.der")
    with pytest.raises(MalformedRequest):
        decode_request(der[:cut])


def test_byte_flips_never_escape_as_other_errors() -> None:
    der = bytearray(vector("req-signed.der"))
    for i in range(len(der)):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytes(der[:i]) + bytes([der[i] ^ flip]) + bytes(der[i + 1:])
            try:
                decode_request(mutated)
            except MalformedRequest:
                pass


def test_error_responses_are_unsigned_statuses() -> None:
    for status in codec.ERROR_STATUSES:
        parsed = parse_response(encode_error(status))
        assert parsed["response_status"].native == status
        assert parsed["response_bytes"].native is None
    with pytest.raises(ValueError):
        encode_error("successful")


def test_exception_tree_carries_wire_status() -> None:
    assert issubclass(codec.Unauthorized, codec.OcspError)
    assert codec.TryLater.status == "try_later"
    assert codec.SigRequired.status == "sign_required"
    assert codec.Unauthorized.status == "unauthorized"


def test_response_echoes_certid_and_verifies(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "codec", "p256")
    req = decode_request(vector("req-sha256-single.der"))
    cid = req.cert_ids[0]
    tu = T0 - timedelta(minutes=1)
    answers = [
        SingleAnswer(cid, "good", tu, tu + timedelta(days=1), archive_cutoff=T0 - timedelta(days=999)),
        SingleAnswer(cid, "revoked", tu, tu + timedelta(days=1), revoked_at=T0 - timedelta(days=2),
                     reason="key_compromise"),
        SingleAnswer(cid, "unknown", tu, tu + timedelta(days=1)),
    ]
    data = encode_response_data(ResponderId(by_key=b"k" * 20), T0.replace(microsecond=123),
                                answers, nonce=b"n" * 32, extended_revoke=True)
    key = ca.signer_key
    der = encode_response(data, lambda b: key.sign(b, ec.ECDSA(hashes.SHA256())),
                          bytes.fromhex("300a06082a8648ce3d040302"),
                          [ca.signer_cert.public_bytes(serialization.Encoding.DER)])
    resp = c_ocsp.load_der_ocsp_response(der)
    assert resp.response_status is c_ocsp.OCSPResponseStatus.SUCCESSFUL
    ca.signer_cert.public_key().verify(resp.signature, resp.tbs_response_bytes,
                                       ec.ECDSA(hashes.SHA256()))
    singles = list(resp.responses)
    assert [s.certificate_status for s in singles] == [
        c_ocsp.OCSPCertStatus.GOOD, c_ocsp.OCSPCertStatus.REVOKED, c_ocsp.OCSPCertStatus.UNKNOWN]
    assert singles[1].revocation_reason is x509.ReasonFlags.key_compromise
    assert resp.produced_at_utc == T0  # no fractional seconds (RFC 5019 §2.2.4)
    parsed = parse_response(der)
    tbs = parsed["response_bytes"]["response"].parsed["tbs_response_data"]
    for single in tbs["responses"]:
        assert single["cert_id"].dump() == cid.der
    assert parsed.nonce_value.native == b"n" * 32
    assert parsed.extended_revoke_value is not None
    assert tbs["responses"][0]["single_extensions"][0]["extn_id"].native == "archive_cutoff"
    assert tbs["responder_id"].name == "by_key"


def test_certid_key_ignores_nothing_but_spelling() -> None:
    a = CertId("sha1", b"n", b"k", 5, b"der-a")
    b = CertId("sha1", b"n", b"k", 5, b"der-b")
    assert a.key == b.key and a != b


@pytest.mark.parametrize("certs", [0, 1, 2])
@pytest.mark.parametrize("nonce", [None, b"n" * 32, b"x" * 128])
def test_spliced_envelope_matches_asn1crypto(tmp_path: Path, certs: int, nonce: bytes | None) -> None:
    """encode_response splices DER by hand; asn1crypto's build is the reference."""
    from datetime import UTC, datetime, timedelta

    from server.ocsp.codec import (
        CertId,
        ResponderId,
        SingleAnswer,
        encode_response,
        encode_response_asn1,
        encode_response_data,
    )
    from tests.ocsp.helpers import request_der

    ca = make_ca(tmp_path, "env", kind="ed25519")  # deterministic signatures
    from server.ocsp.signer import make_signer

    signer = make_signer("env", ca.cert, ca.signer_key, ca.signer_cert)
    cid = decode_request(request_der(ca, [5])).cert_ids[0]
    now = datetime(2030, 1, 1, tzinfo=UTC)
    singles = [SingleAnswer(cid, "good", now, now + timedelta(days=1)),
               SingleAnswer(CertId(cid.hash_algorithm, cid.issuer_name_hash,
                                   cid.issuer_key_hash, 6, cid.der), "revoked", now,
                            now + timedelta(days=1), revoked_at=now, reason="key_compromise")]
    data = encode_response_data(ResponderId(by_key=b"k" * 20), now, singles, nonce=nonce)
    chosen = (signer.certificate_der, signer.ca_certificate_der)[:certs]
    assert (encode_response(data, signer.sign, signer.algorithm_der, chosen)
            == encode_response_asn1(data, signer.sign, signer.algorithm_der, chosen))


def same_issuer(cid: CertId, serial: int) -> CertId:
    """A CertId of the same issuer as cid for another serial (its DER stays cid's: these
    tests compare encodings, which echo whatever DER a CertId carries)."""
    return CertId(cid.hash_algorithm, cid.issuer_name_hash, cid.issuer_key_hash, serial,
                  cid.der)


@pytest.mark.parametrize("nonce", [None, b"", b"n" * 32, bytes(range(200))])
@pytest.mark.parametrize("extended_revoke", [False, True])
@pytest.mark.parametrize("by_name", [False, True])
def test_response_data_der_is_what_asn1crypto_builds(
        tmp_path: Path, nonce: bytes | None, extended_revoke: bool, by_name: bool) -> None:
    """The hand-built tbsResponseData (the signing hot path) equals the asn1crypto one."""
    from datetime import UTC, datetime, timedelta

    from asn1crypto import crl as asn1_crl

    from server.ocsp.codec import (
        ResponderId,
        SingleAnswer,
        encode_response_data,
        encode_response_data_der,
    )
    from tests.ocsp.helpers import request_der

    ca = make_ca(tmp_path, "der")
    cid = decode_request(request_der(ca, [5])).cert_ids[0]
    now = datetime(2030, 1, 1, 12, 30, 15, 987654, tzinfo=UTC)

    day = timedelta(days=1)
    singles = [SingleAnswer(cid, "good", now, now + day),
               SingleAnswer(same_issuer(cid, 6), "unknown", now, now + 7 * day),
               SingleAnswer(same_issuer(cid, 7), "revoked", now, now + day,
                            revoked_at=now - day),
               SingleAnswer(same_issuer(cid, 8), "good", now, now + day,
                            archive_cutoff=now - 900 * day)]
    singles += [SingleAnswer(same_issuer(cid, 10 + code), "revoked", now, now + day,
                             revoked_at=now - code * day, reason=name,
                             archive_cutoff=now - 300 * day if code % 2 else None)
                for code, name in asn1_crl.CRLReason._map.items()]  # noqa: SLF001
    rid = (ResponderId(by_name=ca.cert.subject.public_bytes()) if by_name
           else ResponderId(by_key=b"k" * 20))
    for chosen in (singles, singles[:1], singles[2:3]):
        reference = encode_response_data(rid, now, chosen, nonce=nonce,
                                         extended_revoke=extended_revoke).dump()
        assert encode_response_data_der(rid, now, chosen, nonce=nonce,
                                        extended_revoke=extended_revoke) == reference


@pytest.mark.parametrize("nonce", [None, b"\x00", b"n" * 32, bytes(range(128))])
@pytest.mark.parametrize("extended_revoke", [False, True])
@pytest.mark.parametrize("by_name", [False, True])
def test_response_data_from_parts_is_what_asn1crypto_builds(
        tmp_path: Path, nonce: bytes | None, extended_revoke: bool, by_name: bool) -> None:
    """A nonce answer is signed from a cached answer's parts (responderID, the responses
    SEQUENCE) plus a new producedAt and nonce: the joined bytes must be asn1crypto's
    ResponseData for the same answer, and each part the same bytes as in it."""
    from datetime import UTC, datetime

    from asn1crypto import ocsp as asn1_ocsp

    from server.ocsp.codec import (
        encode_responses_der,
        produced_at_der,
        responder_id_der,
        response_data_der,
    )
    from tests.ocsp.helpers import request_der

    ca = make_ca(tmp_path, "parts")
    cid = decode_request(request_der(ca, [5])).cert_ids[0]
    seconds = int(datetime(2030, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp())
    at = datetime.fromtimestamp(seconds, UTC)
    day = timedelta(days=1)

    answers = [
        SingleAnswer(cid, "good", at, at + day),
        SingleAnswer(same_issuer(cid, 6), "revoked", at, at + day, revoked_at=at - 3 * day,
                     reason="key_compromise", archive_cutoff=at - 400 * day),
        SingleAnswer(same_issuer(cid, 7), "revoked", at, at + day, revoked_at=at - day),
        SingleAnswer(same_issuer(cid, 8), "unknown", at, at + 7 * day),
    ]
    rid = (ResponderId(by_name=ca.cert.subject.public_bytes()) if by_name
           else ResponderId(by_key=b"k" * 20))
    for chosen in (answers, answers[1:2]):
        reference = encode_response_data(rid, at, chosen, nonce=nonce,
                                         extended_revoke=extended_revoke).dump()
        responses = encode_responses_der(chosen)
        built = response_data_der(responder_id_der(rid), produced_at_der(seconds), responses,
                                  nonce=nonce, extended_revoke=extended_revoke)
        assert built == reference
        parsed = asn1_ocsp.ResponseData.load(built)
        assert parsed["responses"].dump() == responses  # the part kept in the cache
        assert parsed["responder_id"].dump() == responder_id_der(rid)
        assert parsed["produced_at"].native == at
        # same parts, another nonce: only the nonce differs from asn1crypto's answer
        other = response_data_der(responder_id_der(rid), produced_at_der(seconds + 1),
                                  responses, nonce=b"other", extended_revoke=extended_revoke)
        assert other == encode_response_data(rid, at + timedelta(seconds=1), chosen,
                                             nonce=b"other",
                                             extended_revoke=extended_revoke).dump()


def test_produced_at_der_is_whole_seconds_utc() -> None:
    from datetime import UTC, datetime

    from asn1crypto import core

    for at in (datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
               datetime(2030, 1, 1, tzinfo=UTC), datetime(2049, 6, 30, 0, 0, 1, tzinfo=UTC)):
        der = codec.produced_at_der(int(at.timestamp()))
        assert der == core.GeneralizedTime(at).dump()
        assert core.GeneralizedTime.load(der).native == at


@pytest.mark.parametrize("serials", [[1], [1, 2], list(range(1, 21))])
def test_plain_request_der_is_a_bare_request_for_the_same_certids(
        tmp_path: Path, serials: list[int]) -> None:
    """The key a nonce answer's CertIDs are kept under: the request without nonce,
    extensions, requestor name or signature (what ``openssl ocsp -no_nonce`` sends)."""
    from asn1crypto import ocsp as asn1_ocsp

    from tests.ocsp.helpers import request_der

    ca = make_ca(tmp_path, "plain")
    for algorithm in ("sha1", "sha256"):
        nonced = decode_request(request_der(ca, serials, algorithm=algorithm,
                                            nonce=b"z" * 16))
        plain = codec.plain_request_der([c.der for c in nonced.cert_ids])
        parsed = asn1_ocsp.OCSPRequest.load(plain, strict=True)
        tbs = parsed["tbs_request"]
        assert [r["req_cert"].dump() for r in tbs["request_list"]] == [
            c.der for c in nonced.cert_ids]
        assert tbs["request_extensions"].native is None
        assert tbs["requestor_name"].native is None
        assert parsed["optional_signature"].native is None
        assert plain == parsed.dump(force=True)  # DER: asn1crypto re-encodes it the same
        ours = decode_request(plain)
        assert ours.cert_ids == nonced.cert_ids and ours.nonce is None
        assert ours.extensions == () and not ours.signed
        # exactly what a client sends for these CertIDs without a nonce
        assert plain == request_der(ca, serials, algorithm=algorithm)

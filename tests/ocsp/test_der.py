"""server.ocsp.der (the minimal DER reader) against codec.decode_request (asn1crypto).

The property: whatever the reader accepts, asn1crypto accepts too, with the same decoded
request — so every refusal stays asn1crypto's. Checked on requests generated with asn1crypto
(several CertIDs, every hash algorithm, nonces of every length, critical or not, other
extensions, requestor names, signed requests with and without certificates) and on
mutations of them (bytes flipped, inserted, deleted, truncated). The shapes clients send must
also be read by the reader itself, not only left to asn1crypto.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asn1crypto import core
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.ocsp.codec import MalformedRequest, decode_request
from server.ocsp.der import parse_request, read_request

MAX_CERTIDS = 5
KEY = ec.generate_private_key(ec.SECP256R1())
_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "requestor")])
CERT = (x509.CertificateBuilder().subject_name(_name).issuer_name(_name)
        .public_key(KEY.public_key()).serial_number(7)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=30))
        .sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
HASH_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


@st.composite
def requests(draw: Any) -> tuple[bytes, bool]:
    """(DER, whether the reader must read it itself)."""
    canonical = True
    cert_ids = []
    for _ in range(draw(st.integers(1, 7))):
        alg = draw(st.sampled_from(sorted(HASH_SIZES)))
        size = HASH_SIZES[alg] if draw(st.booleans()) else draw(st.integers(0, 70))
        one: dict[str, Any] = {"req_cert": {
            "hash_algorithm": {"algorithm": alg},
            "issuer_name_hash": draw(st.binary(min_size=size, max_size=size)),
            "issuer_key_hash": draw(st.binary(min_size=20, max_size=20)),
            "serial_number": draw(st.integers(-(2 ** 70), 2 ** 160))}}
        if draw(st.integers(0, 9)) == 0:  # singleRequestExtensions: left to asn1crypto
            one["single_request_extensions"] = [{"extn_id": "service_locator", "extn_value": {
                "issuer": asn1_x509.Name.build({"common_name": "x"}),
                "locator": [{"access_method": "ocsp",
                             "access_location": asn1_x509.GeneralName(
                                 name="uniform_resource_identifier",
                                 value="http://x/")}]}}]
            canonical = False
        cert_ids.append(one)
    if len(cert_ids) > MAX_CERTIDS:
        canonical = False
    tbs: dict[str, Any] = {"request_list": cert_ids}
    extensions = []
    if draw(st.booleans()):
        nonce = draw(st.binary(min_size=0, max_size=140))
        canonical = canonical and 1 <= len(nonce) <= 128
        extensions.append({"extn_id": "nonce", "critical": draw(st.booleans()),
                           "extn_value": core.OctetString(nonce)})
    if draw(st.integers(0, 5)) == 0:
        extensions.append({"extn_id": "acceptable_responses", "extn_value": ["basic_ocsp_response"]})
        canonical = False
    if extensions:
        tbs["request_extensions"] = extensions
    if draw(st.integers(0, 5)) == 0:
        tbs["requestor_name"] = asn1_x509.GeneralName(
            name="directory_name", value=asn1_x509.Name.build({"common_name": "r"}))
        canonical = False
    request: dict[str, Any] = {"tbs_request": asn1_ocsp.TBSRequest(tbs)}
    if draw(st.booleans()):
        signature = KEY.sign(request["tbs_request"].dump(), ec.ECDSA(hashes.SHA256()))
        sig: dict[str, Any] = {"signature_algorithm": {"algorithm": "sha256_ecdsa"},
                               "signature": signature}
        if draw(st.booleans()):
            sig["certs"] = [asn1_x509.Certificate.load(CERT)]
        request["optional_signature"] = sig
    return bytes(asn1_ocsp.OCSPRequest(request).dump()), canonical


def reference(der: bytes) -> Any:
    try:
        return decode_request(der, max_certids=MAX_CERTIDS)
    except MalformedRequest:
        return None


def final(der: bytes) -> Any:
    """What the service gets: the reader's request, else asn1crypto's (None: refused)."""
    try:
        return parse_request(der, MAX_CERTIDS)
    except MalformedRequest:
        return None


def same_or_left(der: bytes) -> Any:
    """The reader's result, after checking it against asn1crypto's."""
    fast = read_request(der, MAX_CERTIDS)
    if fast is not None:
        assert reference(der) == fast, der.hex()
    return fast


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_generated_requests_read_as_asn1crypto_reads_them(case: tuple[bytes, bool]) -> None:
    der, canonical = case
    fast = same_or_left(der)
    if canonical:
        assert fast is not None, "a shape clients send was left to asn1crypto"
    assert final(der) == reference(der)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                               st.integers(0, 10_000), st.integers(0, 255)),
                     min_size=1, max_size=3)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), MUTATIONS)
def test_mutated_requests_never_read_otherwise(case: tuple[bytes, bool],
                                               mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(case[0])
    for op, where, value in mutations:
        i = where % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] = value
        elif op == "insert":
            data.insert(i, value)
        elif op == "delete" and i < len(data):
            del data[i]
        elif op == "truncate":
            del data[i:]
    der = bytes(data)
    same_or_left(der)
    assert final(der) == reference(der)  # whatever the path, the answer is asn1crypto's


@pytest.mark.parametrize("der_hex", [
    "3000",  # empty SEQUENCE
    "30",  # truncated
    "308200053003300130",  # non-minimal length
    "30 0b 30 09 a0 03 02 01 00 30 02 30 00".replace(" ", ""),  # version written out, empty Request
])
def test_odd_encodings_are_left_to_asn1crypto(der_hex: str) -> None:
    assert read_request(bytes.fromhex(der_hex), MAX_CERTIDS) is None


def test_version_written_out_is_read() -> None:
    plain = asn1_ocsp.OCSPRequest({"tbs_request": {"request_list": [{"req_cert": {
        "hash_algorithm": {"algorithm": "sha1"}, "issuer_name_hash": b"n" * 20,
        "issuer_key_hash": b"k" * 20, "serial_number": 5}}]}}).dump()
    tbs = asn1_ocsp.OCSPRequest.load(plain)["tbs_request"]
    body = b"\xa0\x03\x02\x01\x00" + tbs["request_list"].dump()
    tbs_der = b"\x30" + bytes([len(body)]) + body
    der = b"\x30" + bytes([len(tbs_der)]) + tbs_der
    fast = same_or_left(der)
    assert fast is not None and fast.cert_ids[0].serial == 5

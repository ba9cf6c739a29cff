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
from server.ocsp.der import NonceShapes, parse_request, read_request

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


@settings(max_examples=300, deadline=None,  # no timed tests: a loaded machine is slow
          suppress_health_check=[HealthCheck.too_slow])
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


@settings(max_examples=1500, deadline=None,  # no timed tests: a loaded machine is slow
          suppress_health_check=[HealthCheck.too_slow])
@given(requests(), MUTATIONS)
def test_mutated_requests_never_read_otherwise(case: tuple[bytes, bool],
                                               mutations: list[tuple[str, int, int]]) -> None:
    der = mutate(case[0], mutations, None)
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


# --- NonceShapes: the parse of a nonce request reused for the same bytes but the nonce -------
#
# Whatever the memo answers must be what parse_request answers for the same bytes: the same
# OcspRequest, or MalformedRequest with the same status and message.


def parsed(parse: Any, der: bytes) -> Any:
    try:
        return parse(der)
    except MalformedRequest as exc:
        return ("refused", exc.status, str(exc))


def plain_parse(der: bytes) -> Any:
    return parsed(lambda d: parse_request(d, MAX_CERTIDS), der)


def nonce_span(der: bytes) -> tuple[int, int] | None:
    """Where the parsed nonce's octets sit in der (the last place they occur), if any."""
    request = plain_parse(der)
    if isinstance(request, tuple) or request.nonce is None:
        return None
    start = der.rfind(request.nonce)
    return start, start + len(request.nonce)


def nonce_request(nonce: bytes, serial: int = 5, *, after: list[dict[str, Any]] | None = None,
                  ) -> bytes:
    """An unsigned request for one CertID with this nonce (then the extensions in after)."""
    extensions: list[dict[str, Any]] = [{"extn_id": "nonce", "critical": False,
                                         "extn_value": core.OctetString(nonce)}]
    extensions += after or []
    return bytes(asn1_ocsp.OCSPRequest({"tbs_request": {
        "request_list": [{"req_cert": {"hash_algorithm": {"algorithm": "sha1"},
                                       "issuer_name_hash": b"n" * 20,
                                       "issuer_key_hash": b"k" * 20,
                                       "serial_number": serial}}],
        "request_extensions": extensions}}).dump())


SHARED = NonceShapes(MAX_CERTIDS)  # across examples too: what one example learnt stays


@settings(max_examples=100, deadline=None,  # no timed tests: a loaded machine is slow
          suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_nonce_shapes_parse_as_parse_request(case: tuple[bytes, bool], data: Any) -> None:
    der = case[0]
    for shapes in (NonceShapes(MAX_CERTIDS), SHARED):
        assert parsed(shapes.parse, der) == plain_parse(der)
        span = nonce_span(der)
        if span is None:
            continue
        start, end = span
        size = end - start
        # the same request with other nonces of the same length (the memo-hit path), the
        # flipped octets (what learning tried) and the first nonce again
        values = [data.draw(st.binary(min_size=size, max_size=size)) for _ in range(3)]
        values += [bytes(b ^ 0xFF for b in der[start:end]), der[start:end]]
        for value in values:
            other = der[:start] + value + der[end:]
            assert parsed(shapes.parse, other) == plain_parse(other), other.hex()


def mutate(der: bytes, mutations: list[tuple[str, int, int]], tail: int | None) -> bytes:
    """MUTATIONS applied to der; with tail, only at its last tail+1 positions (where a
    learnt shape's nonce sits)."""
    data = bytearray(der)
    for op, where, value in mutations:
        if tail is None:
            i = where % (len(data) + 1)
        else:
            i = max(0, len(data) - where % (tail + 1))
        if op == "flip" and i < len(data):
            data[i] = value
        elif op == "insert":
            data.insert(i, value)
        elif op == "delete" and i < len(data):
            del data[i]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


@settings(max_examples=200, deadline=None,  # no timed tests: a loaded machine is slow
          suppress_health_check=[HealthCheck.too_slow])
@given(requests(), MUTATIONS, st.booleans())
def test_mutated_requests_after_a_learnt_shape_read_as_parse_request(
        case: tuple[bytes, bool], mutations: list[tuple[str, int, int]], at_tail: bool) -> None:
    """Shapes learnt first (the generated request, and usual ones whose nonces are an octet
    or two longer or shorter, so that those lengths are tried too), then a mutation of the
    generated request (anywhere, or in its nonce): read as parse_request reads it."""
    der = case[0]
    shapes = NonceShapes(MAX_CERTIDS)
    first = parsed(shapes.parse, der)
    size = len(first.nonce) if not isinstance(first, tuple) and first.nonce else 16
    for other in (size - 1, size + 1, size + 2):
        shapes.parse(nonce_request(b"s" * min(128, max(1, other)), serial=77))
    mutated = mutate(der, mutations, size if at_tail else None)
    assert parsed(shapes.parse, mutated) == plain_parse(mutated), mutated.hex()


def test_a_learnt_shape_is_not_taken_for_a_request_of_another_length() -> None:
    """A shape is learnt for one nonce length: bytes equal to its prefix followed by a
    nonce of another length that is also tried (a longer one: trailing data; a shorter
    one: a truncated request) are not a request with that nonce."""
    shapes = NonceShapes(MAX_CERTIDS)
    for size in (20, 16, 12):
        shapes.parse(nonce_request(bytes([size]) * size, serial=size))  # three lengths known
    shapes.parse(nonce_request(b"a" * 16))  # the shape under test: a 16-octet nonce
    for bad in (nonce_request(b"b" * 16) + b"XXXX",  # 4 octets of trailing data
                nonce_request(b"b" * 16)[:-4]):  # truncated inside the nonce
        assert parsed(shapes.parse, bad) == plain_parse(bad)
        assert isinstance(plain_parse(bad), tuple)  # refused: malformedRequest


def other_extension(value: bytes) -> dict[str, Any]:
    return {"extn_id": "1.3.6.1.4.1.55555.1", "critical": False,
            "extn_value": core.OctetString(value).dump()}


@pytest.mark.parametrize("size", [1, 16, 32])
def test_nonce_octets_at_the_end_but_not_last_are_never_a_shape(size: int) -> None:
    """The request ends with octets equal to the nonce, but they belong to an extension
    after the nonce: changing them changes that extension, not the nonce."""
    nonce = bytes(range(1, size + 1))
    shapes = NonceShapes(MAX_CERTIDS)
    first = nonce_request(nonce, after=[other_extension(b"\x04\x00" + nonce)])
    request = parse_request(first, MAX_CERTIDS)
    assert first.endswith(request.nonce or b"!") and request.extensions
    assert parsed(shapes.parse, first) == request
    for tail in (b"\xee" * size, bytes(reversed(nonce)), nonce):
        variant = nonce_request(nonce, after=[other_extension(b"\x04\x00" + tail)])
        assert variant[:-size] == first[:-size]
        got = parsed(shapes.parse, variant)
        assert got == plain_parse(variant)
        assert got.nonce == nonce and got.extensions[0].value.endswith(tail)
    assert not shapes._known  # noqa: SLF001 - nothing learnt from such requests

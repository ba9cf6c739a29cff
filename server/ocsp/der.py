"""A strict, minimal DER reader for the OCSPRequests clients send (RFC 6960 §4.1.1).

Strategy: requests that are not answered from the cache (a nonce makes every request new)
used to be parsed by asn1crypto, ~40 µs each. ``read_request`` walks the DER itself — tag,
minimal definite length, value — for the shapes clients send: one or several CertIDs, a
nonce, a version written out, an optionalSignature (signature algorithm, BIT STRING, the
requestor's certificates). It returns the same ``OcspRequest`` that ``codec.decode_request``
would, or None for anything else (any other extension, a requestorName, a length or
encoding it does not accept, too many CertIDs …): then ``decode_request`` (asn1crypto)
decides, so what this reader accepts is a subset of what asn1crypto accepts, and every
refusal is still asn1crypto's, with its message. tests/ocsp/test_der.py proves the subset
property with hypothesis on generated and mutated requests. Pure: no I/O, no Twisted.
"""

from __future__ import annotations

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509

from server.ocsp.codec import (
    MAX_NONCE_OCTETS,
    MIN_NONCE_OCTETS,
    CertId,
    OcspError,
    OcspRequest,
    RequestSignature,
)

_NONCE_OID = bytes.fromhex("2b06010505073001 02".replace(" ", ""))  # 1.3.6.1.5.5.7.48.1.2
_DIGESTS = dict(algos.DigestAlgorithmId._map)  # dotted OID -> asn1crypto's name
_SIGNATURES = dict(algos.SignedDigestAlgorithmId._map)
_oid_names: dict[tuple[bytes, int], str] = {}


class _Reject(Exception):
    """Not a shape this reader accepts: asn1crypto decides."""


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the TLV at pos; low tag numbers and minimal
    definite lengths only."""
    if pos + 2 > end:
        raise _Reject
    tag = der[pos]
    if tag & 0x1F == 0x1F:
        raise _Reject
    n = der[pos + 1]
    pos += 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 3 or pos + count > end or der[pos] == 0:
            raise _Reject
        n = int.from_bytes(der[pos:pos + count], "big")
        if n < 0x80 or (count > 1 and n < 1 << (8 * (count - 1))):
            raise _Reject
        pos += count
    if pos + n > end:
        raise _Reject
    return tag, pos, pos + n


def _oid(der: bytes, start: int, end: int, names: dict[str, str]) -> str:
    """The OID's name in names (asn1crypto's map), else its dotted form."""
    key = (der[start:end], id(names))
    found = _oid_names.get(key)  # type: ignore[call-overload]
    if found is not None:
        return found
    arcs: list[int] = []
    value = 0
    if start >= end or der[end - 1] & 0x80:
        raise _Reject
    for i in range(start, end):
        b = der[i]
        if value == 0 and b == 0x80:  # a non-minimal arc
            raise _Reject
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    dotted = ".".join(str(a) for a in head + arcs[1:])
    name = names.get(dotted, dotted)
    if len(_oid_names) < 1024:
        _oid_names[key] = name  # type: ignore[index]
    return name


def _algorithm(der: bytes, pos: int, end: int, names: dict[str, str]) -> tuple[str, int]:
    """An AlgorithmIdentifier (parameters absent or NULL): (name, end of it)."""
    tag, start, stop = _tlv(der, pos, end)
    if tag != 0x30:
        raise _Reject
    tag, o_start, o_end = _tlv(der, start, stop)
    if tag != 0x06:
        raise _Reject
    if o_end != stop and der[o_end:stop] != b"\x05\x00":
        raise _Reject
    return _oid(der, o_start, o_end, names), stop


def _cert_id(der: bytes, pos: int, end: int) -> tuple[CertId, int]:
    tag, start, stop = _tlv(der, pos, end)
    if tag != 0x30:
        raise _Reject
    alg, p = _algorithm(der, start, stop, _DIGESTS)
    tag, n_start, n_end = _tlv(der, p, stop)
    if tag != 0x04:
        raise _Reject
    tag, k_start, k_end = _tlv(der, n_end, stop)
    if tag != 0x04:
        raise _Reject
    tag, s_start, s_end = _tlv(der, k_end, stop)
    if tag != 0x02 or s_end != stop or s_start == s_end:
        raise _Reject
    if s_end - s_start > 1 and (
            (der[s_start] == 0 and not der[s_start + 1] & 0x80)
            or (der[s_start] == 0xFF and der[s_start + 1] & 0x80)):
        raise _Reject  # a non-minimal INTEGER
    serial = int.from_bytes(der[s_start:s_end], "big", signed=True)
    return CertId(alg, der[n_start:n_end], der[k_start:k_end], serial, der[pos:stop]), stop


def _nonce(der: bytes, start: int, end: int) -> bytes:
    """requestExtensions' value holding exactly one extension, the nonce: its octets."""
    tag, e_start, e_end = _tlv(der, start, end)  # Extensions
    if tag != 0x30 or e_end != end:
        raise _Reject
    tag, x_start, x_end = _tlv(der, e_start, e_end)  # Extension
    if tag != 0x30 or x_end != e_end:
        raise _Reject
    tag, o_start, o_end = _tlv(der, x_start, x_end)
    if tag != 0x06 or der[o_start:o_end] != _NONCE_OID:
        raise _Reject
    tag, v_start, v_end = _tlv(der, o_end, x_end)
    if tag == 0x01:  # critical: only TRUE (FALSE is the DEFAULT, never written in DER)
        if der[v_start:v_end] != b"\xff":
            raise _Reject
        tag, v_start, v_end = _tlv(der, v_end, x_end)
    if tag != 0x04 or v_end != x_end:
        raise _Reject
    tag, n_start, n_end = _tlv(der, v_start, v_end)  # the nonce: one OCTET STRING
    if tag != 0x04 or n_end != v_end or not MIN_NONCE_OCTETS <= n_end - n_start <= \
            MAX_NONCE_OCTETS:
        raise _Reject
    return der[n_start:n_end]


def _signature(der: bytes, start: int, end: int, tbs: bytes) -> RequestSignature:
    tag, s_start, s_end = _tlv(der, start, end)  # Signature
    if tag != 0x30 or s_end != end:
        raise _Reject
    alg, p = _algorithm(der, s_start, s_end, _SIGNATURES)
    alg_der = der[s_start:p]
    tag, b_start, b_end = _tlv(der, p, s_end)
    if tag != 0x03 or b_start == b_end or der[b_start] != 0:
        raise _Reject  # a BIT STRING of whole octets
    certs: list[bytes] = []
    if b_end != s_end:
        tag, c_start, c_end = _tlv(der, b_end, s_end)
        if tag != 0xA0 or c_end != s_end:
            raise _Reject
        tag, q_start, q_end = _tlv(der, c_start, c_end)
        if tag != 0x30 or q_end != c_end:
            raise _Reject
        p = q_start
        while p < q_end:
            tag, _, c_stop = _tlv(der, p, q_end)
            if tag != 0x30:
                raise _Reject
            cert = der[p:c_stop]
            try:  # asn1crypto parses requestor certificates whole: so must this reader
                _ = asn1_x509.Certificate.load(cert, strict=True).native
            except Exception:  # noqa: BLE001 - asn1crypto decides (and says why)
                raise _Reject from None
            certs.append(cert)
            p = c_stop
    return RequestSignature(algorithm=alg, signature=der[b_start + 1:b_end], tbs_der=tbs,
                            certs=tuple(certs), algorithm_der=alg_der)


def read_request(der: bytes, max_certids: int) -> OcspRequest | None:
    """The request, as ``codec.decode_request`` would decode it; None: not a shape read
    here (``decode_request`` then decides, and refuses what is malformed)."""
    try:
        end = len(der)
        tag, start, stop = _tlv(der, 0, end)  # OCSPRequest
        if tag != 0x30 or stop != end:
            raise _Reject
        tbs_pos = start
        tag, t_start, t_end = _tlv(der, start, stop)  # TBSRequest
        if tag != 0x30:
            raise _Reject
        tag, p, q = _tlv(der, t_start, t_end)
        if tag == 0xA0:  # version, written out: v1 only
            if der[p:q] != b"\x02\x01\x00":
                raise _Reject
            tag, p, q = _tlv(der, q, t_end)
        if tag != 0x30:  # requestList (a requestorName [1] is left to asn1crypto)
            raise _Reject
        cert_ids = []
        r = p
        while r < q:
            tag, r_start, r_end = _tlv(der, r, q)  # Request
            if tag != 0x30:
                raise _Reject
            cert_id, after = _cert_id(der, r_start, r_end)
            if after != r_end:  # singleRequestExtensions: asn1crypto
                raise _Reject
            cert_ids.append(cert_id)
            if len(cert_ids) > max_certids:
                raise _Reject
            r = r_end
        if not cert_ids:
            raise _Reject
        nonce = None
        if q != t_end:
            tag, x_start, x_end = _tlv(der, q, t_end)
            if tag != 0xA2 or x_end != t_end:
                raise _Reject
            nonce = _nonce(der, x_start, x_end)
        signature = None
        if t_end != stop:
            tag, g_start, g_end = _tlv(der, t_end, stop)
            if tag != 0xA0 or g_end != stop:
                raise _Reject
            signature = _signature(der, g_start, g_end, der[tbs_pos:t_end])
    except (_Reject, IndexError):
        return None
    return OcspRequest(cert_ids=tuple(cert_ids), nonce=nonce, signature=signature,
                       extensions=(), requestor_name=None)


def parse_request(der: bytes, max_certids: int) -> OcspRequest:
    """``read_request``, else ``codec.decode_request`` (which raises MalformedRequest)."""
    from server.ocsp.codec import decode_request

    found = read_request(der, max_certids)
    return found if found is not None else decode_request(der, max_certids=max_certids)


class NonceShapes:
    """``parse_request`` for nonce requests, with the parse of each shape remembered: a
    request whose bytes are those of a request already parsed but for the value of its
    nonce (same length, the nonce's octets last: how ``openssl ocsp`` and most clients
    write it) parses to the same request with the new nonce. A nonce octet string takes any
    value, so that is exact, not a guess; a shape is kept only once flipping its nonce
    octets has been shown to change the parsed nonce alone. Bounded; not for signed
    requests (their signature covers the nonce)."""

    MAX_SHAPES = 1024
    MAX_LENGTHS = 4  # distinct nonce lengths tried on each request

    def __init__(self, max_certids: int) -> None:
        self.max_certids = max_certids
        # the request's bytes but its nonce -> (the parse, the nonce's length)
        self._known: dict[bytes, tuple[OcspRequest, int]] = {}
        self._lengths: list[int] = []

    def parse(self, der: bytes) -> OcspRequest:
        """``parse_request(der, max_certids)``; raises MalformedRequest the same way."""
        known = self._known
        for n in self._lengths:
            found = known.get(der[:-n]) if len(der) > n else None
            if found is not None and found[1] == n:  # (the lengths inside say n octets)
                request = found[0]
                return OcspRequest(cert_ids=request.cert_ids, nonce=der[-n:], signature=None,
                                   extensions=request.extensions,
                                   requestor_name=request.requestor_name)
        request = parse_request(der, self.max_certids)
        nonce = request.nonce
        if nonce is not None and request.signature is None and der.endswith(nonce):
            self._learn(der, request, len(nonce))
        return request

    def _learn(self, der: bytes, request: OcspRequest, n: int) -> None:
        flipped = der[:-n] + bytes(b ^ 0xFF for b in der[-n:])
        try:
            check = parse_request(flipped, self.max_certids)
        except OcspError:
            return
        if (check.nonce != flipped[-n:] or check.cert_ids != request.cert_ids
                or check.extensions != request.extensions
                or check.requestor_name != request.requestor_name):
            return  # the last octets were not (only) the nonce
        if len(self._known) >= self.MAX_SHAPES:
            self._known.clear()
        self._known[der[:-n]] = (request, n)
        if n not in self._lengths:
            if len(self._lengths) >= self.MAX_LENGTHS:
                self._lengths.pop(0)
            self._lengths.append(n)

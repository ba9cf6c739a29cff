"""Fuzzing (hypothesis): LDAP PDU decoding, the LDAP connection, filter translation and
evaluation over the real demo store, OCSP request parsing, the OCSP GET path decoder.

Only the protocols' own errors may come out (LDAP ``ProtocolError``/``LdapError``, OCSP
``MalformedRequest``), never an internal error, and every input is handled within a time
bound. ``CERTPUB_FUZZ_EXAMPLES`` sets the examples per test (default 150 for CI);
``CERTPUB_FUZZ_EXAMPLES=20000 scripts/test tests/hostile/test_fuzz.py`` is a long run.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport

from server.ldap import codec
from server.ldap.entries import parse_dn, render
from server.ldap.errors import LdapError, ProtocolError, ResultCode
from server.ldap.filters import to_text
from server.ldap.plan import plan
from server.ldap.schema import describe, select
from server.ocsp.codec import MalformedRequest, decode_request
from server.http.ocsp import decode_get_path
from store import names
from store.sqlite import Store, StoreError
from tests.hostile import wire

EXAMPLES = int(os.environ.get("CERTPUB_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
PER_INPUT = 2.0  # seconds: generous for CI machines, far below anything a client notices
PRIVATE_NAMES = {"telephonenumber", "2.5.4.20", "street", "streetaddress", "2.5.4.9",
                 "serialnumber", "2.5.4.5", "postaladdress", "2.5.4.16", "userpassword"}


def bounded(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    t = time.monotonic()
    try:
        return fn(*args, **kw)
    finally:
        elapsed = time.monotonic() - t
        assert elapsed < PER_INPUT, f"{fn.__name__} took {elapsed:.2f} s"


# --- strategies ---------------------------------------------------------------------------------

PUBLIC_ATTRS = ["mail", "MAIL", "cn", "commonName", "2.5.4.3", "OID.2.5.4.3", "sn", "givenName",
                "o", "ou", "c", "l", "st", "objectClass", "userCertificate",
                "userCertificate;binary", "cACertificate;binary", "certificateRevocationList",
                "certpubSerialNumber", "certpubStatus", "certpubNotAfter",
                "certpubRevocationTime", "certpubRevocationReason", "certpubCA"]
HIDDEN_ATTRS = ["telephoneNumber", "2.5.4.20", "street", "streetAddress", "2.5.4.9",
                "serialNumber", "2.5.4.5", "postalAddress", "userPassword", "foo", "",
                "cn;lang-en", "mail;binary", "1.2.3", "cn;", ";", "supportedLDAPVersion",
                "namingContexts", "\u00e9", "mail\x00"]
attr_names = st.sampled_from(PUBLIC_ATTRS + HIDDEN_ATTRS) | st.text(max_size=12)
VALUES = [b"chan", b"MO", b"*", b"%", b"_", b"\\", b"' OR 1=1 --", b"\x00", b"", b"a" * 300,
          b'{ serialNumber 1, issuer rdnSequence:"cn=Demo RSA Issuing CA,c=MO" }',
          b"{ serialNumber 0x80, issuer rdnSequence:\"c=MO\" }", b"20260101000000Z",
          b"19991231235959+0800", b"valid", b"revoked", b"80", b"ff00", b"0x01", b"2.5.6.0",
          b"inetOrgPerson", b"pkiUser", b"\x30\x03\x02\x01\x01", b"\xff\xfe", "澳門".encode(),
          b"+853 2833 1003", b"Avenida de Almeida Ribeiro"]
values = st.sampled_from(VALUES) | st.binary(max_size=48) | st.text(max_size=24).map(str.encode)
RULES = [None, "caseIgnoreMatch", "2.5.13.2", "caseExactMatch", "integerMatch",
         "certificateExactMatch", "2.5.13.34", "generalizedTimeOrderingMatch",
         "objectIdentifierMatch", "caseIgnoreSubstringsMatch", "1.2.3.4", "nonsense"]


def _leaf() -> st.SearchStrategy[bytes]:
    match = st.tuples(st.sampled_from([0xA3, 0xA5, 0xA6, 0xA8]), attr_names, values).map(
        lambda t: codec.tlv(t[0], codec.octets(t[1]) + codec.octets(t[2])))
    present = attr_names.map(wire.present)
    sub = st.tuples(attr_names, st.none() | values, st.lists(values, max_size=3),
                    st.none() | values).filter(lambda t: t[1] or t[2] or t[3]).map(
        lambda t: wire.substr(t[0], t[1], t[2], t[3]))
    ext = st.tuples(st.sampled_from(RULES), st.none() | attr_names, values, st.booleans()).filter(
        lambda t: t[0] is not None or t[1] is not None).map(
        lambda t: wire.extensible(t[0], t[1], t[2], t[3]))
    return st.one_of(match, present, sub, ext)


filters = st.recursive(
    _leaf(),
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(lambda xs: wire.and_(*xs)),
                            st.lists(inner, max_size=4).map(lambda xs: wire.or_(*xs)),
                            inner.map(wire.not_)),
    max_leaves=24)
attr_lists = st.lists(st.sampled_from(PUBLIC_ATTRS + HIDDEN_ATTRS + ["*", "+", "1.1"]),
                      max_size=6)


def _corpus() -> list[bytes]:
    paged = codec.encode_controls([("1.2.840.113556.1.4.319", False,
                                    codec.paged_value(5, b""))])
    critical = codec.encode_controls([("1.2.3.4.5", True, b"x")])
    ops = [
        wire.bind_op(),
        codec.tlv(0x60, codec.integer(3) + codec.octets("cn=x") + codec.tlv(0x80, b"pw")),
        codec.tlv(0x60, codec.integer(3) + codec.octets("") + codec.tlv(
            0xA3, codec.octets("EXTERNAL"))),
        wire.search_op("c=MO", wire.eq("mail", "chan.taiman@cem.example.mo"), ["mail"]),
        wire.search_op("c=MO", wire.and_(wire.present("mail"), wire.or_(
            wire.substr("cn", "ch", ["a"], "n"), wire.not_(wire.eq("o", "x")))), ["*", "+"]),
        wire.search_op("", wire.present("objectClass"), ["+"], scope=0),
        wire.search_op("cn=Subschema", wire.present("objectClass"), ["*"], scope=0),
        wire.search_op("c=MO", wire.extensible("2.5.13.34", "userCertificate",
                                               VALUES[10]), ["1.1"]),
        wire.compare_op("c=MO", "c", "MO"),
        codec.tlv(0x77, codec.octets("1.3.6.1.4.1.4203.1.11.3", 0x80)),
        codec.tlv(0x77, codec.octets("1.3.6.1.4.1.1466.20037", 0x80)),
        codec.tlv(0x50, b"\x01"),
        codec.octets("c=MO", 0x4A),
        codec.tlv(0x66, codec.octets("c=MO") + codec.tlv(0x30, b"")),
    ]
    out = [wire.message(i + 1, op) for i, op in enumerate(ops)]
    out.append(wire.message(40, ops[3], paged))
    out.append(wire.message(41, ops[3], critical))
    return out


CORPUS = _corpus()


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup",
                                     "length"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x84, 0xFF, 0x30, 0xA0]))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[i:]
        elif kind == "dup":
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j]
        else:  # a length byte replaced by a long form
            data[i:i + 1] = draw(st.sampled_from([b"\x84\xff\xff\xff\xff", b"\x82\x00\x00",
                                                  b"\x81\x7f", b"\x80", b"\x85\x01\x00\x00\x00\x00"]))
    return bytes(data)


# --- LDAP decoding ----------------------------------------------------------------------------


def _decode(data: bytes) -> None:
    try:
        total = codec.frame_length(data[:6], 262_143)
    except ProtocolError:
        total = None
    assert total is None or total >= 2
    try:
        bounded(codec.decode_message, data)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=4096))
def test_ldap_decode_random_bytes(data: bytes) -> None:
    _decode(data)
    _decode(b"\x30" + data)


@FUZZ
@given(mutated(CORPUS))
def test_ldap_decode_mutated_pdus(data: bytes) -> None:
    _decode(data)


@FUZZ
@given(st.integers(1, 20_000), st.lists(st.sampled_from([0xA0, 0xA1, 0xA2]), min_size=1,
                                        max_size=5))
def test_ldap_deep_nesting_is_refused_quickly(depth: int, kinds: list[int]) -> None:
    filt = wire.present("objectClass")
    for i in range(depth):
        filt = codec.tlv(kinds[i % len(kinds)], filt)
    pdu = wire.message(1, wire.search_op("c=MO", filt))
    if depth + 1 > 100:
        with pytest.raises(ProtocolError):
            bounded(codec.decode_message, pdu)
    else:
        msg = bounded(codec.decode_message, pdu)
        assert isinstance(msg.request, codec.SearchRequest)
        bounded(to_text, msg.request.filter)


# --- the directory: filters over the demo store ------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_store(hostile_store_path: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Store]:
    from tests.hostile.conftest import copy_store

    s = Store.open(copy_store(hostile_store_path, tmp_path_factory.mktemp("fuzzstore")))
    yield s
    s.close()


@pytest.fixture(scope="module")
def ldap_factory(fuzz_store: Store, demo_pki: Any) -> Any:
    from server.config import load_config
    from server.ldap.server import make_ldap_factory

    config = dataclasses.replace(load_config(demo_pki.config_path).ldap, scan_limit=5000)
    return make_ldap_factory(config, fuzz_store, None, None, lambda: datetime.now(UTC))


def private_dn(demo_pki: Any) -> str:
    return next(c.subject_rfc4514 for c in demo_pki.certs if "2.5.4.20=" in c.subject_rfc4514)


@FUZZ
@given(filt=filters, attrs=attr_lists, scope=st.integers(0, 2), base_pick=st.integers(0, 4))
def test_filter_translation_and_evaluation(ldap_factory: Any, demo_pki: Any, filt: bytes,
                                           attrs: list[str], scope: int, base_pick: int) -> None:
    directory = ldap_factory.directory
    bases = ["c=MO", "", "cn=Subschema", private_dn(demo_pki), "o=Nowhere,c=MO"]
    try:
        msg = codec.decode_message(wire.message(1, wire.search_op(bases[base_pick], filt, attrs,
                                                                  scope)))
    except ProtocolError:
        event("refused by the decoder")
        return  # e.g. a string that is not UTF-8: refused before any evaluation
    req = msg.request
    assert isinstance(req, codec.SearchRequest)
    now = datetime.now(UTC)

    def run() -> int:
        to_text(req.filter)
        plan(req.filter, directory.allow)
        try:
            base = directory.base(parse_dn(req.base), now)
            hits = 0
            selection = select(req.attributes)
            for hit in directory.search(base, req.scope, req.filter, now):
                if hit is None:
                    continue
                hits += 1
                for name, _ in render(hit.entry, selection, directory.allow, False):
                    assert name.split(";")[0].lower() not in PRIVATE_NAMES, name
                    t, ok = describe(name)
                    assert t is not None and ok and directory.allow.allows(t, hit.entry.meta)
                for secret in ("2833 ", "Almeida Ribeiro", "ID-"):
                    assert secret not in hit.entry.dn
                if hits >= 300:
                    break
            return hits
        except (LdapError, names.DNSyntaxError):
            return -1

    hits = bounded(run)
    event("ldap error" if hits < 0 else "no entry" if hits == 0 else "entries")


# --- the LDAP connection: random and mutated streams --------------------------------------------


def _drive(factory: Any, chunks: list[bytes]) -> bytes:
    pending: list[Callable[[], None]] = []
    factory.cooperator = Cooperator(scheduler=lambda f: pending.append(f) or _Call(),
                                    started=True)
    clock = Clock()
    factory.call_later = clock.callLater
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.9", 40000))
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 40000))
    proto.makeConnection(transport)
    try:
        for chunk in chunks:
            proto.dataReceived(chunk)
            for _ in range(10_000):
                if not pending:
                    break
                pending.pop(0)()
            if transport.disconnecting:
                break
    finally:
        proto.connectionLost(None)
    return transport.value()


class _Call:
    def cancel(self) -> None:
        pass


def _responses(out: bytes) -> list[wire.Pdu]:
    pdus, pos = [], 0
    while pos < len(out):
        _, _, end = wire.read_tlv(out, pos)
        pdus.append(wire.parse_pdu(out[pos:end]))
        pos = end
    return pdus


def _check_stream(factory: Any, stream: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]
    out = bounded(_drive, factory, chunks)
    for pdu in _responses(out):  # every answer is well-formed, none is an internal error
        if pdu.tag in (0x61, 0x65, 0x67, 0x69, 0x6B, 0x6D, 0x6F, 0x78):
            assert pdu.code != int(ResultCode.OTHER), pdu


@FUZZ
@given(st.lists(mutated(CORPUS) | st.sampled_from(CORPUS), min_size=1, max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_ldap_connection_mutated_streams(ldap_factory: Any, pdus: list[bytes],
                                         cuts: list[int]) -> None:
    _check_stream(ldap_factory, b"".join(pdus), cuts)


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=8))
def test_ldap_connection_random_bytes(ldap_factory: Any, data: bytes, cuts: list[int]) -> None:
    _check_stream(ldap_factory, data, cuts)
    _check_stream(ldap_factory, b"\x30\x82" + data, cuts)


@FUZZ
@given(filt=filters, attrs=attr_lists)
def test_ldap_connection_generated_searches(ldap_factory: Any, filt: bytes,
                                            attrs: list[str]) -> None:
    stream = wire.message(1, wire.search_op("c=MO", filt, attrs)) + wire.message(
        2, wire.search_op("c=MO", filt, attrs, scope=1))
    _check_stream(ldap_factory, stream, [])


# --- OCSP ---------------------------------------------------------------------------------------


def _ocsp_corpus(demo_pki: Any) -> list[bytes]:
    out = []
    for c in [c for c in demo_pki.certs if c.ca in ("rsa-ca", "ec-ca")][:6]:
        issuer = x509.load_pem_x509_certificate(demo_pki.cas[c.ca].cert_path.read_bytes())
        out.append(wire.ocsp_request(c.load(), issuer, nonce=True))
        out.append(wire.ocsp_request(c.load(), issuer, nonce=False))
    return out


@pytest.fixture(scope="module")
def ocsp_corpus(demo_pki: Any) -> list[bytes]:
    return _ocsp_corpus(demo_pki)


def _parse(der: bytes) -> None:
    try:
        bounded(decode_request, der)
    except MalformedRequest:
        pass


@FUZZ
@given(st.binary(max_size=4096))
def test_ocsp_decode_random_bytes(data: bytes) -> None:
    _parse(data)
    _parse(b"\x30\x82" + len(data).to_bytes(2, "big") + data)


@FUZZ
@given(st.data())
def test_ocsp_decode_mutated_requests(ocsp_corpus: list[bytes], data: st.DataObject) -> None:
    _parse(data.draw(mutated(ocsp_corpus)))


@pytest.fixture(scope="module")
def ocsp_service(demo_pki: Any, fuzz_store: Store) -> Any:
    from server.config import load_config
    from server.ocsp.service import OcspService

    return OcspService(load_config(demo_pki.config_path), fuzz_store, lambda: datetime.now(UTC))


@FUZZ
@given(st.data())
def test_ocsp_service_never_answers_internal_error(ocsp_service: Any, ocsp_corpus: list[bytes],
                                                   data: st.DataObject) -> None:
    der = data.draw(mutated(ocsp_corpus) | st.binary(max_size=512))
    out = bounded(ocsp_service.answer, der, ocsp_service.now())  # the call the server makes
    assert out.status in ("successful", "malformed_request", "unauthorized"), out
    assert out.der


@FUZZ
@given(st.binary(max_size=600) | st.text(max_size=600).map(str.encode))
def test_ocsp_get_path_decoder_random(raw: bytes) -> None:
    try:
        bounded(decode_get_path, raw)
    except MalformedRequest:
        pass


@FUZZ
@given(st.data())
def test_ocsp_get_path_decoder_encodings(ocsp_corpus: list[bytes], data: st.DataObject) -> None:
    der = data.draw(st.sampled_from(ocsp_corpus))
    b64 = base64.b64encode(der).decode()
    style = data.draw(st.sampled_from(["plain", "quoted", "urlsafe", "unpadded", "mixed"]))
    if style == "quoted":
        b64 = quote(b64, safe="")
    elif style == "urlsafe":
        b64 = base64.urlsafe_b64encode(der).decode()
    elif style == "unpadded":
        b64 = b64.rstrip("=")
    elif style == "mixed":
        b64 = "".join(quote(ch, safe="") if data.draw(st.booleans()) else ch for ch in b64)
    assert bounded(decode_get_path, b64.encode()) == der


def test_store_is_read_only_for_fuzzing(fuzz_store: Store) -> None:
    """The fuzzed directory and responder only read: the store generation never moved."""
    try:
        assert int(fuzz_store.generation()) >= 1
    except StoreError as exc:  # pragma: no cover - reported as a failure
        pytest.fail(str(exc))

"""The LDAP connection without sockets: framing, limits, result codes, logs; ldaptor as oracle."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldaptor import ldapfilter
from ldaptor.protocols import pureber, pureldap
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from server.ldap import codec
from server.ldap.server import LdapFactory, make_ldap_factory
from store.sqlite import Store
from tests.ldap.ber import DECODER, written
from tests.ldap.conftest import ldap_config

class Client:
    """A protocol on a StringTransport, its cooperator pumped by a fake clock."""

    def __init__(self, factory: LdapFactory, clock: Clock) -> None:
        self.clock = clock
        self.proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        assert self.proto is not None
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes, chunk: int | None = None) -> list[Any]:
        if chunk is None:
            self.proto.dataReceived(data)
        else:
            for i in range(0, len(data), chunk):
                self.proto.dataReceived(data[i : i + chunk])
        return written(self.clock, self.transport)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


@pytest.fixture
def make(store: Store, demo_now: datetime) -> Any:
    def build(**overrides: Any) -> Client:
        clock = Clock()
        factory = make_ldap_factory(ldap_config(**overrides), store, None, None, lambda: demo_now)
        factory.cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f),
                                        terminationPredicateFactory=lambda: lambda: False)
        factory.call_later = clock.callLater
        factory.timer = clock.seconds
        return Client(factory, clock)

    return build


def search(text: str, base: str = "c=MO", attrs: tuple[str, ...] = (), mid: int = 2,
           size: int = 0, scope: int = 2, controls: Any = None, types_only: bool = False) -> bytes:
    req = pureldap.LDAPSearchRequest(baseObject=base, scope=scope, sizeLimit=size,
                                     filter=ldapfilter.parseFilter(text), attributes=list(attrs),
                                     typesOnly=types_only)
    return pureldap.LDAPMessage(req, id=mid, controls=controls).toWire()  # type: ignore[no-any-return]


def done(messages: list[Any]) -> Any:
    assert isinstance(messages[-1].value, pureldap.LDAPSearchResultDone), messages
    return messages[-1].value


def entries(messages: list[Any]) -> list[Any]:
    return [m.value for m in messages if isinstance(m.value, pureldap.LDAPSearchResultEntry)]


def test_mail_search_whole_byte_by_byte_and_pipelined(make: Any, demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)
    pdu = search(f"(mail={good.emails[0]})", attrs=("usercertificate;binary",))
    for chunk in (None, 1, 7):
        c = make()
        msgs = c.send(pdu + search("(objectClass=*)", base="", scope=0, mid=3), chunk)
        # pipelined searches run concurrently: answers are told apart by message ID
        by_id = {m.id: m.value for m in msgs if isinstance(m.value, pureldap.LDAPSearchResultEntry)}
        assert len(by_id) == 2 and by_id[3].objectName == b""
        names = [a[0] for a in by_id[2].attributes]
        assert names == [b"userCertificate;binary"]
        assert not c.closed


def test_trailing_partial_pdu_waits(make: Any) -> None:
    c = make()
    pdu = search("(cn=nobody)")
    assert done(c.send(pdu + pdu[:5])).resultCode == 0
    assert done(c.send(pdu[5:])).resultCode == 0


@pytest.mark.parametrize("raw", [
    b"\x30\x84\xff\xff\xff\xff",  # 4 GiB length header
    b"\x30\x85\x01\x00\x00\x00\x00",  # length of length too long
    b"\x30\x80",  # indefinite length
    b"\x04\x01x",  # not a SEQUENCE
    b"\x30\x03\x02\x01\x01",  # no protocolOp
    b"\x30\x06\x02\x01\x01\x7f\x01\x00",  # multi-byte tag
    b"\x30\x05\x02\x01\x01\x79\x00",  # unknown operation (application 25)
    b"\x30\x0a\x02\x01\x01\x63\x05\x04\x00\x0a\x01\x09",  # truncated search, bad scope
])
def test_malformed_or_oversized_pdu_disconnects(make: Any, raw: bytes) -> None:
    c = make()
    with capturedLogs() as events:
        msgs = c.send(raw)
    assert c.closed
    notice = msgs[-1].value
    assert isinstance(notice, pureldap.LDAPExtendedResponse)
    assert notice.resultCode == 2 and notice.responseName == codec.NOTICE_OF_DISCONNECTION.encode()
    assert not any(e.get("log_failure") for e in events)
    assert c.send(search("(cn=x)")) == []  # nothing more is read


def test_oversized_header_refused_before_body(make: Any) -> None:
    c = make(max_request_bytes=2048)
    big = search("(cn=" + "x" * 4000 + ")")
    c.send(big[:6])
    assert c.closed and len(c.proto._buf) == 0


@pytest.mark.parametrize("depth", [101, 10_000])
def test_deep_not_nesting_disconnects_without_traceback(make: Any, depth: int) -> None:
    inner = codec.tlv(0x87, b"cn")
    for _ in range(depth):
        inner = codec.tlv(0xA2, inner)
    body = (codec.octets("c=MO") + codec.integer(2, 0x0A) + codec.integer(0, 0x0A)
            + codec.integer(0) + codec.integer(0) + codec.tlv(0x01, b"\x00") + inner
            + codec.tlv(0x30, b""))
    pdu = codec.tlv(0x30, codec.integer(1) + codec.tlv(0x63, body))
    c = make(max_request_bytes=16 * 1024 * 1024)
    with capturedLogs() as events:
        msgs = c.send(pdu)
    assert c.closed and msgs[-1].value.resultCode == 2
    assert not any(e.get("log_failure") for e in events)


def test_filter_depth_within_limit_is_served(make: Any) -> None:
    text = "(!" * 50 + "(cn=zz)" + ")" * 50
    assert done(make().send(search(text))).resultCode == 0


@pytest.mark.parametrize(("dn", "password", "auth", "code"), [
    ("", b"", None, 0),
    ("cn=admin,c=MO", b"secret", None, 49),
    ("", b"secret", None, 49),
    ("cn=admin,c=MO", b"", None, 53),
    ("", b"", "EXTERNAL", 7),
])
def test_bind_result_codes(make: Any, dn: str, password: bytes, auth: str | None,
                           code: int) -> None:
    c = make()
    if auth is None:
        req = pureldap.LDAPBindRequest(dn=dn, auth=password)
    else:
        req = pureldap.LDAPBindRequest(dn=dn, auth=(auth, None), sasl=True)
    with capturedLogs() as events:
        msgs = c.send(pureldap.LDAPMessage(req, id=1).toWire())
    assert msgs[0].value.resultCode == code
    assert all(b"secret" not in repr(e).encode() for e in events)


@pytest.mark.parametrize("req", [
    pureldap.LDAPAddRequest(entry="cn=x,c=MO", attributes=[
        (pureber.BEROctetString("cn"), pureber.BERSet([pureber.BEROctetString("x")]))]),
    pureldap.LDAPDelRequest(entry="cn=x,c=MO"),
    pureldap.LDAPModifyRequest(object="c=MO", modification=[]),
    pureldap.LDAPModifyDNRequest(entry="c=MO", newrdn="c=PT", deleteoldrdn=True),
])
def test_writes_are_refused(make: Any, store: Store, req: Any) -> None:
    generation = store.generation()
    msgs = make().send(pureldap.LDAPMessage(req, id=4).toWire())
    assert msgs[0].value.resultCode == 53
    assert store.generation() == generation


def test_compare(make: Any, demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)
    found = entries(make().send(search(f"(mail={good.emails[0]})", attrs=("1.1",))))
    dn = found[0].objectName.decode()

    def cmp(attr: str, value: str) -> int:
        req = pureldap.LDAPCompareRequest(entry=dn, ava=pureldap.LDAPAttributeValueAssertion(
            pureber.BEROctetString(attr), pureber.BEROctetString(value)))
        return int(make().send(pureldap.LDAPMessage(req, id=5).toWire())[0].value.resultCode)

    assert cmp("mail", good.emails[0].upper()) == 6
    assert cmp("MAIL", "nobody@example.mo") == 5
    assert cmp("telephoneNumber", "x") == 17
    assert cmp("sn", "x") in (16, 5)
    assert cmp("certificateRevocationList", "x") == 16


def test_size_limits_types_only_and_paging(make: Any) -> None:
    c = make(size_limit=3)
    msgs = c.send(search("(objectClass=*)"))
    assert len(entries(msgs)) == 3 and done(msgs).resultCode == 4
    msgs = c.send(search("(objectClass=*)", size=2))
    assert len(entries(msgs)) == 2 and done(msgs).resultCode == 4
    msgs = c.send(search("(cACertificate=*)", types_only=True))
    assert all(all(not vals for _, vals in e.attributes) for e in entries(msgs))
    # paged results (RFC 2696): pages of 5 until the cookie is empty; server limit per page
    c = make()
    cookie, seen = b"", []
    for _ in range(100):
        value = codec.paged_value(5, cookie)
        msgs = c.send(search("(objectClass=*)", controls=[("1.2.840.113556.1.4.319", True, value)]))
        seen += [e.objectName for e in entries(msgs)]
        cookie = done_controls(msgs[-1])
        if not cookie:
            break
    everything = [e.objectName for e in entries(make(size_limit=10_000).send(search("(objectClass=*)")))]
    assert seen == everything


def done_controls(message: Any) -> bytes:
    controls = message.controls or []
    for oid, _critical, value in controls:
        if oid == b"1.2.840.113556.1.4.319":
            return codec.decode_paged_value(value)[1]
    raise AssertionError("no paged results control")


def test_controls_and_extended_operations(make: Any) -> None:
    c = make()
    msgs = c.send(search("(cn=x)", controls=[("1.2.3.4", True, None)]))
    assert done(msgs).resultCode == 12
    assert done(c.send(search("(cn=x)", controls=[("1.2.3.4", False, None)]))).resultCode == 0
    whoami = pureldap.LDAPExtendedRequest(requestName="1.3.6.1.4.1.4203.1.11.3")
    assert c.send(pureldap.LDAPMessage(whoami, id=9).toWire())[0].value.resultCode == 0
    starttls = pureldap.LDAPExtendedRequest(requestName="1.3.6.1.4.1.1466.20037")
    assert c.send(pureldap.LDAPMessage(starttls, id=10).toWire())[0].value.resultCode == 52
    unknown = pureldap.LDAPExtendedRequest(requestName="1.2.3.4.5")
    assert c.send(pureldap.LDAPMessage(unknown, id=11).toWire())[0].value.resultCode == 2
    assert not c.closed
    c.send(pureldap.LDAPMessage(pureldap.LDAPUnbindRequest(), id=12).toWire())
    assert c.closed


def test_store_failure_answers_unavailable(make: Any, store: Store) -> None:
    c = make()
    from store.sqlite import StoreError

    def broken(*_: Any, **__: Any) -> Any:
        raise StoreError("disk on fire")

    c.proto.factory.directory.store = type("Broken", (), {"__getattr__": lambda s, n: broken})()
    assert done(c.send(search("(mail=a@b)"))).resultCode == 52


def test_log_lines_look_like_slapd(make: Any) -> None:
    with capturedLogs() as events:
        make().send(search("(mail=nobody@example.mo)", attrs=("userCertificate;binary",)))
    from twisted.logger import formatEvent

    lines = [formatEvent(e) for e in events]
    assert any('SRCH base="c=MO" scope=2 deref=0 filter="(mail=nobody@example.mo)" '
               'attrs="userCertificate;binary"' in line for line in lines), lines
    assert any("SEARCH RESULT tag=101 err=0 nentries=0 etime=" in line for line in lines)
    assert any("ACCEPT from IP=192.0.2.7:40000" in line for line in lines)


@pytest.mark.parametrize(("levels", "wanted"), [
    (("warn",), False), (("error",), False), (("info",), True), (("debug",), True),
    (("warn", "info"), True), (("warn", None), True)])
def test_info_lines_probed_through_certpubs_level_filter(monkeypatch: Any, levels: tuple[Any, ...],
                                                         wanted: bool) -> None:
    """``certpub serve`` installs ``server.logs.LevelFilter``: at warn the session writes no
    per-operation info lines (it formatted two per search, dropped by the filter); any other
    observer, or one filter that lets info through, keeps them."""
    from twisted.logger import LogLevel, globalLogPublisher

    from server.ldap.protocol import info_enabled
    from server.logs import LevelFilter

    observers = [(lambda e: None) if lv is None else LevelFilter(lambda e: None,
                                                                  LogLevel.levelWithName(lv))
                 for lv in levels]
    monkeypatch.setattr(globalLogPublisher, "_observers", observers)
    assert info_enabled() is wanted


def test_connection_limits(store: Store, demo_now: datetime) -> None:
    factory = make_ldap_factory(ldap_config(max_connections_per_address=2), store, None, None,
                                lambda: demo_now)
    addr = IPv4Address("TCP", "192.0.2.9", 1)
    protos = [factory.buildProtocol(addr) for _ in range(3)]
    assert protos[2] is None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 1)) is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_decoder_raises_only_protocol_error(data: bytes) -> None:
    from server.ldap.errors import ProtocolError

    for pdu in (data, codec.tlv(0x30, data), codec.tlv(0x30, codec.integer(1) + codec.tlv(0x63, data))):
        try:
            codec.decode_message(pdu)
        except ProtocolError:
            pass


def test_responses_decode_with_ldaptor() -> None:
    entry = codec.encode_entry(3, "cn=Ana,c=MO", [("cn", [b"Ana"]), ("userCertificate;binary", [b"\x30\x00"])])
    msg, _ = pureber.berDecodeObject(DECODER, entry)
    assert msg.id == 3 and msg.value.objectName == b"cn=Ana,c=MO"
    assert [(a, list(v)) for a, v in msg.value.attributes] == [
        (b"cn", [b"Ana"]), (b"userCertificate;binary", [b"\x30\x00"])]
    msg, _ = pureber.berDecodeObject(DECODER, codec.encode_result(2**31 - 1, 0x65, 4, "c=MO", "x"))
    assert msg.id == 2**31 - 1 and msg.value.resultCode == 4 and msg.value.matchedDN == b"c=MO"


def test_idle_timeout_spares_a_request_arriving_in_the_same_turn(make: Any) -> None:
    """The soak's race, made on purpose: a search sent just as idle_timeout expires is in the
    socket, unread, when the timer fires (the reactor runs timers before it reads). Closing
    then would drop it ("session terminated by server"); the protocol peeks, keeps the
    connection and answers; a connection silent for the next timeout is closed as before."""
    import socket

    client = make(idle_timeout=30.0)
    ours, peer = socket.socketpair()
    try:
        client.transport.socket = ours  # what tcp.Server has: the connection's socket
        assert done(client.send(search("(mail=*)", size=1))).resultCode in (0, 4)
        client.clock.advance(29.5)
        peer.sendall(search("(cn=*)", mid=3, size=1))  # arrives in the turn the timer fires
        client.clock.advance(0.5)
        assert not client.closed
        assert done(client.send(ours.recv(65536))).resultCode in (0, 4)
        client.clock.advance(30.0)
        assert client.closed  # silent since: the usual Notice of Disconnection and close
    finally:
        ours.close()
        peer.close()


def test_idle_timeout_rearms_while_an_answer_is_computed(make: Any) -> None:
    """A timeout that fires while an answer is pending starts a new one (it used to reset a
    call the mixin had already dropped: the connection then never timed out again)."""
    client = make(idle_timeout=30.0)
    client.proto._slots.append(object())  # an answer still being computed
    client.clock.advance(30.0)
    assert not client.closed
    client.proto._slots.clear()
    client.clock.advance(30.0)
    assert client.closed

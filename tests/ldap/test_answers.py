"""Pre-encoded answers: kept, found, bounded, and never served stale after an import commits
(on both store engines, through the factory the server builds, with its change feed)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from ldaptor.protocols import pureldap
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport

from server.feed import ChangeFeed
from server.ldap.answers import Answer, AnswerCache, frame, split_message_id
from server.ldap.server import make_ldap_factory
from server.metrics import Metrics
from store import open_store
from store.model import CaId, Change, Generation, Serial
from tests.ldap.conftest import ldap_config
from tests.ldap.ber import written
from tests.ldap.test_protocol import search
from tests.ocsp.helpers import T0, fill_store, make_ca


def answer(keys: frozenset[str] | None, until: float = float("inf"), size: int = 10) -> Answer:
    return Answer((b"\x64\x00" * size, b"\x65\x07\x0a\x01\x00\x04\x00\x04\x00"), 1, until, keys,
                  ("c=MO", 2, 0, "(mail=x)", ""))


def key(n: int) -> Any:
    return (f"k{n}", 2, "(mail=x)", (), False, 500)


def test_frame_and_split_are_inverse() -> None:
    for mid in (0, 1, 127, 128, 255, 256, 65535, 2**31 - 1):
        op = b"\x42\x00"
        pdu = frame(mid, op)
        assert split_message_id(pdu) == (mid, op)
        assert answer(None).encode(mid).startswith(frame(mid, b"\x64\x00" * 10)[:4])


def test_invalidation_drops_base_answers_by_key_and_filter_answers_on_any_cert_change() -> None:
    cache = AnswerCache(1 << 20)
    assert cache.put(key(1), b"r1", answer(frozenset({"cn=a,c=mo"})), cache.epoch)
    assert cache.put(key(2), b"r2", answer(frozenset({"cn=b,c=mo"})), cache.epoch)
    assert cache.put(key(3), b"r3", answer(None), cache.epoch)
    change = Change(Generation(1), "cert", CaId(1), Serial(5), "cn=a,c=mo")
    cache.invalidate([change])
    assert cache.by_raw(b"r1", 0) is None and cache.by_raw(b"r3", 0) is None
    assert cache.by_raw(b"r2", 0) is not None
    cache.invalidate([Change(Generation(2), "crl", CaId(1), None, None)])
    assert len(cache) == 0 and cache.bytes == 0


def test_an_answer_computed_across_an_invalidation_is_not_kept() -> None:
    cache = AnswerCache(1 << 20)
    epoch = cache.epoch
    cache.invalidate([Change(Generation(1), "cert", CaId(1), Serial(5), "cn=a,c=mo")])
    assert not cache.put(key(1), b"r1", answer(None), epoch)
    assert cache.by_raw(b"r1", 0) is None


def test_bounded_by_bytes_least_recently_used_first_and_expiring() -> None:
    one = answer(None).size + 2
    cache = AnswerCache(one * 3)
    for n in range(5):
        assert cache.put(key(n), b"r%d" % n, answer(None), cache.epoch)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.by_raw(b"r0", 0) is None and cache.by_raw(b"r4", 0)
    assert cache.put(key(9), b"r9", answer(None, until=100.0), cache.epoch)
    assert cache.by_raw(b"r9", 99.0) is not None
    assert cache.by_raw(b"r9", 100.0) is None and cache.by_normal(key(9), b"x", 50.0) is None
    assert not AnswerCache(0).put(key(1), b"r", answer(None), 0)  # off


class Client:
    """A protocol on a StringTransport, its cooperator pumped by a fake clock."""

    def __init__(self, factory: Any) -> None:
        self.clock = Clock()
        factory.cooperator = Cooperator(scheduler=lambda f: self.clock.callLater(0, f),
                                        terminationPredicateFactory=lambda: lambda: False)
        self.proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> list[Any]:
        self.proto.dataReceived(data)
        return written(self.clock, self.transport)


@pytest.fixture
def live(store_location: str, tmp_path: Path) -> Iterator[tuple[Any, Any, Any, Any]]:
    ca = make_ca(tmp_path / "ca", "answers")
    ca.subscriber(1)
    store = open_store(store_location)
    fill_store(store, ca, T0)
    feed = ChangeFeed(store)
    feed.prime()
    metrics = Metrics(process=False)
    factory = make_ldap_factory(ldap_config(), store, feed, None, lambda: T0, metrics=metrics)
    yield factory, feed, store, ca
    store.close()


def certs(messages: list[Any]) -> list[bytes]:
    out = []
    for m in messages:
        if isinstance(m.value, pureldap.LDAPSearchResultEntry):
            for name, values in m.value.attributes:
                if name.lower() == b"usercertificate;binary":
                    out += [bytes(v) for v in values]
    return out


def test_no_stale_answer_after_an_import_commits(live: tuple[Any, Any, Any, Any]) -> None:
    factory, feed, store, ca = live
    client = Client(factory)
    attrs = ("userCertificate;binary",)
    mail1 = search("(mail=s1@example.test)", attrs=attrs)
    mail2 = search("(mail=s2@example.test)", attrs=attrs)
    base1 = search("(objectClass=*)", base="cn=Subscriber 1,o=certpub tests,c=MO", scope=0,
                   attrs=attrs)
    first = ca.certs[1].public_bytes(Encoding.DER)
    assert certs(client.send(mail1)) == [first]
    assert certs(client.send(mail2)) == []  # not issued yet: an empty answer, kept too
    assert certs(client.send(base1)) == [first]
    before = factory.answers.hits
    for pdu in (mail1, mail2, base1):  # now all three come from the kept answers
        client.send(pdu)
    assert factory.answers.hits == before + 3 and len(factory.answers) == 3

    # one import: certificate 2 issued, certificate 1 revoked
    ca.subscriber(2)
    fill_store(store, ca, T0 + timedelta(minutes=1),
               revoked={1: (T0, None)})
    feed.poll()
    second = ca.certs[2].public_bytes(Encoding.DER)
    assert certs(client.send(mail2)) == [second]
    assert certs(client.send(mail1)) == []  # revoked: no longer usable
    assert certs(client.send(base1)) == []
    rendered = factory.metrics.render().decode()
    assert 'certpub_ldap_answer_cache_total{result="hit"} 3.0' in rendered
    assert 'certpub_requests_total{operation="search",protocol="ldap",result="success"}' in rendered


def test_a_base_answer_survives_an_import_elsewhere(live: tuple[Any, Any, Any, Any]) -> None:
    factory, feed, store, ca = live
    client = Client(factory)
    base1 = search("(objectClass=*)", base="cn=Subscriber 1,o=certpub tests,c=MO", scope=0,
                   attrs=("userCertificate;binary",))
    client.send(base1)
    ca.subscriber(3)
    fill_store(store, ca, T0 + timedelta(minutes=1))
    feed.poll()
    hits = factory.answers.hits
    assert len(certs(client.send(base1))) == 1
    assert factory.answers.hits == hits + 1  # the change touched another entry only


def test_no_answer_is_served_while_the_feed_cannot_read_the_store(
        live: tuple[Any, Any, Any, Any]) -> None:
    factory, feed, store, ca = live
    client = Client(factory)
    mail1 = search("(mail=s1@example.test)", attrs=("userCertificate;binary",))
    client.send(mail1)
    assert len(factory.answers) == 1
    feed.healthy = False  # an import may commit unseen: the kept answers are not trusted
    hits = factory.answers.hits
    assert len(certs(client.send(mail1))) == 1
    assert factory.answers.hits == hits and len(factory.answers) == 0

"""The LDAP connection with its store work in store threads: order, abandon, loss, errors.

The protocol runs on a StringTransport; its store work runs in a real pool over the demo
store, behind a gate that holds a chosen read. Waits are on conditions with generous
timeouts, never assertions on time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from ldaptor.protocols import pureber, pureldap
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport

from server.ldap.server import make_ldap_factory
from server.storeaccess import StoreAccess
from store.sqlite import Store
from tests.ldap.ber import decode
from tests.ldap.conftest import ldap_config
from tests.ldap.test_protocol import search
from tests.test_storeaccess import WAIT, BrokenStore, Gate, GatedStore, wait_event


async def until(condition: Callable[[], bool]) -> None:
    """Spin the reactor until condition holds (fails after WAIT seconds)."""
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


class Conn:
    def __init__(self, factory: Any) -> None:
        self.proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 40000))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def messages(self) -> list[Any]:
        return decode(self.transport.value())


@pytest.fixture
def make(ldap_store_path: Path, demo_now: datetime) -> Iterator[Callable[..., Any]]:
    made: list[StoreAccess] = []

    def build(opener: Callable[[], Any], **overrides: Any) -> tuple[Conn, Any]:
        access = StoreAccess(str(ldap_store_path), 2, opener=opener)
        access.start()
        made.append(access)
        config = ldap_config(naming_contexts=("c=MO",), **overrides)
        factory = make_ldap_factory(config, None, None, None, lambda: demo_now,  # type: ignore[arg-type]
                                    access=access)
        return Conn(factory), factory

    yield build
    for access in made:
        access.stop()


def gated(path: Path, gate: Gate) -> Callable[[], Any]:
    return lambda: GatedStore(Store.open(path, create=False), gate)


def bind(mid: int) -> bytes:
    return pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn="", auth=b""), id=mid).toWire()  # type: ignore[no-any-return]


def dse(mid: int) -> bytes:
    return search("(objectClass=*)", base="", scope=0, mid=mid)


def compare(mid: int, dn: str, attr: str, value: str) -> bytes:
    req = pureldap.LDAPCompareRequest(entry=dn, ava=pureldap.LDAPAttributeValueAssertion(
        pureber.BEROctetString(attr), pureber.BEROctetString(value)))
    return pureldap.LDAPMessage(req, id=mid).toWire()  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_answers_leave_in_request_order(make: Any, ldap_store_path: Path,
                                              demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)
    gate = Gate("published_matches")
    conn, _ = make(gated(ldap_store_path, gate))
    gate.armed = True
    try:
        # a mail search that hangs in the store, then a bind and a root DSE search
        conn.proto.dataReceived(search(f"(mail={good.emails[0]})", mid=1) + bind(2) + dse(3))
        assert await wait_event(gate.entered)
        await until(lambda: conn.proto.pending == 1)  # the root DSE search is done
        assert conn.transport.value() == b""  # ... and waits behind the first answer
    finally:
        gate.release.set()
    await until(lambda: conn.proto.pending == 0)
    msgs = conn.messages()
    assert [(m.id, type(m.value).__name__) for m in msgs] == [
        (1, "LDAPSearchResultEntry"), (1, "LDAPSearchResultDone"), (2, "LDAPBindResponse"),
        (3, "LDAPSearchResultEntry"), (3, "LDAPSearchResultDone")]
    assert msgs[1].value.resultCode == 0 and msgs[4].value.resultCode == 0


@pytest_twisted.ensureDeferred
async def test_abandon_and_loss_while_in_the_pool_write_nothing(
        make: Any, ldap_store_path: Path, demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)
    gate = Gate("published_matches")
    conn, _ = make(gated(ldap_store_path, gate))
    gate.armed = True
    abandon = pureldap.LDAPMessage(pureldap.LDAPAbandonRequest(id=1), id=2).toWire()
    try:
        conn.proto.dataReceived(search(f"(mail={good.emails[0]})", mid=1) + abandon)
        assert await wait_event(gate.entered)
    finally:
        gate.armed = False
        gate.release.set()
    await until(lambda: conn.proto.pending == 0)
    assert conn.transport.value() == b""  # RFC 4511 §4.11: no answer to an abandoned search
    conn.proto.dataReceived(dse(3))
    await until(lambda: conn.proto.pending == 0 and conn.transport.value() != b"")
    assert [m.id for m in conn.messages()] == [3, 3]

    gate2 = Gate("published_matches")
    lost, _ = make(gated(ldap_store_path, gate2))
    gate2.armed = True
    try:
        lost.proto.dataReceived(search(f"(mail={good.emails[0]})", mid=1) + dse(2))
        assert await wait_event(gate2.entered)
        lost.proto.connectionLost(None)
    finally:
        gate2.release.set()
    await until(lambda: lost.proto.pending == 0)
    assert lost.transport.value() == b""


@pytest_twisted.ensureDeferred
async def test_store_errors_in_the_pool_are_unavailable_and_a_full_queue_busy(
        make: Any, ldap_store_path: Path, demo_pki: Any) -> None:
    conn, _ = make(BrokenStore)
    conn.proto.dataReceived(search("(mail=x@example.mo)", mid=1)
                            + compare(2, "cn=x,c=MO", "cn", "x") + dse(3))
    await until(lambda: conn.proto.pending == 0 and len(conn.messages()) == 4)
    msgs = conn.messages()
    assert [(m.id, int(m.value.resultCode)) for m in msgs if hasattr(m.value, "resultCode")] == [
        (1, 52), (2, 52), (3, 0)]  # the root DSE of configured contexts reads no store

    gate = Gate("published_matches")
    busy, _ = make(gated(ldap_store_path, gate), max_outstanding=1)
    gate.armed = True
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)
    try:
        busy.proto.dataReceived(search(f"(mail={good.emails[0]})", mid=1))
        assert await wait_event(gate.entered)
        busy.proto.dataReceived(compare(2, "c=MO", "c", "MO"))
    finally:
        gate.release.set()
    await until(lambda: busy.proto.pending == 0)
    msgs = busy.messages()
    assert [(m.id, int(m.value.resultCode)) for m in msgs if hasattr(m.value, "resultCode")] == [
        (1, 0), (2, 51)]


@pytest_twisted.ensureDeferred
async def test_compare_in_the_pool(make: Any, ldap_store_path: Path, demo_pki: Any) -> None:
    good = next(c for c in demo_pki.certs if c.state == "good" and c.emails)
    conn, _ = make(lambda: Store.open(ldap_store_path, create=False))
    conn.proto.dataReceived(search(f"(mail={good.emails[0]})", mid=1, attrs=("1.1",)))
    await until(lambda: len(conn.messages()) == 2)
    dn = conn.messages()[0].value.objectName.decode()
    conn.transport.clear()
    conn.proto.dataReceived(compare(2, dn, "mail", good.emails[0].upper())
                            + compare(3, dn, "mail", "nobody@example.mo")
                            + compare(4, dn, "telephoneNumber", "x"))
    await until(lambda: len(conn.messages()) == 3)
    assert [(m.id, int(m.value.resultCode)) for m in conn.messages()] == [(2, 6), (3, 5), (4, 17)]

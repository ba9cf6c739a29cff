"""Named hostile cases against a real listener pair (LDAP and HTTP from one ``app.start``).

Every case runs while a ``Heartbeat`` client, connected before the attack, keeps using its
LDAP and keep-alive HTTP connections (each round must succeed within 1 s), and is followed by
a normal LDAP search and OCSP request on new connections, each answered within 1 s.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted

from server.ldap.errors import ResultCode
from tests.hostile import wire
from tests.hostile.conftest import Live, fresh_check, heartbeat, in_thread

PROTOCOL_ERROR = int(ResultCode.PROTOCOL_ERROR)


def expect_notice_and_close(client: wire.LdapClient, code: int = PROTOCOL_ERROR,
                            within: float = 2.0) -> None:
    """The server answers a Notice of Disconnection with ``code`` and closes, in time."""
    t = time.monotonic()
    pdus = client.read_until_closed(within)
    assert time.monotonic() - t < within
    assert pdus, "closed without a Notice of Disconnection"
    last = pdus[-1]
    assert last.message_id == 0 and last.tag == wire.NOTICE and last.code == code, last


def expect_closed(sock: socket.socket, within: float) -> float:
    """Seconds until the server closed the connection (reads and drops what it sends)."""
    t = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"server did not close the connection within {within} s") from None
    return time.monotonic() - t


# --- the attacks (blocking; each asserts what the server must do) -------------------------------


def truncated_pdu(live: Live) -> None:
    # (a) outer length honest, inner element claims more than its container holds
    with wire.LdapClient(live.ldap) as c:
        op = wire.search_op("c=MO", wire.present("objectClass"))
        inner = wire.integer(1) + op[:-5]
        c.send(bytes([0x30, len(inner)]) + inner if len(inner) < 0x80
               else b"\x30\x82" + len(inner).to_bytes(2, "big") + inner)
        expect_notice_and_close(c)
    # (b) a valid PDU cut in the middle, then the client half-closes
    with wire.LdapClient(live.ldap) as c:
        pdu = wire.message(1, wire.search_op("c=MO", wire.present("objectClass")))
        c.send(pdu[: len(pdu) // 2])
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_until_closed(2.0) == []


def four_gib_length(live: Live) -> None:
    over = live.config.ldap.max_request_bytes + 1  # just over the configured limit
    for header in (b"\x30\x84\xff\xff\xff\xff", b"\x30\x84" + over.to_bytes(4, "big"),
                   b"\x30\x85\x01\x00\x00\x00\x00", b"\x30\x80"):
        with wire.LdapClient(live.ldap) as c:
            c.send(header)
            expect_notice_and_close(c, within=1.0)


def nested_filter(live: Live) -> None:
    deep_not = wire.nested_not(10_000)
    deep_and = wire.present("objectClass")
    for _ in range(10_000):
        deep_and = wire.and_(deep_and)
    for filt in (deep_not, deep_and):
        assert len(filt) > 20_000
        with wire.LdapClient(live.ldap) as c:
            t = time.monotonic()
            c.request(wire.search_op("c=MO", filt))
            expect_notice_and_close(c, within=1.0)
            assert time.monotonic() - t < 1.0


def unknown_operation(live: Live) -> None:
    for op in (wire.tlv(0x71, b""), wire.tlv(0x7E, b"\x04\x00"), wire.tlv(0x04, b"abc"),
               wire.tlv(0x9F, b"")):
        with wire.LdapClient(live.ldap) as c:
            c.send(wire.message(7, op))
            expect_notice_and_close(c)


def random_64k(live: Live) -> None:
    rng = random.Random(64)
    blobs = [os.urandom(65536), bytes(rng.getrandbits(8) for _ in range(65536))]
    framed = bytearray(blobs[1])
    framed[0:4] = b"\x30\x83\x00\xff"  # a plausible LDAPMessage header, then noise
    blobs.append(bytes(framed))
    for blob in blobs:
        with wire.LdapClient(live.ldap) as c:
            try:
                c.send(blob)
            except (BrokenPipeError, ConnectionResetError):
                continue  # closed before we finished writing: fine
            expect_closed(c.sock, 2.0)


def ocsp_oversize_post(live: Live) -> None:
    limit = live.config.http.max_request_bytes
    # announced by Content-Length: refused from the headers alone
    s = socket.create_connection(live.http, timeout=3)
    s.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
              b"Content-Length: %d\r\n\r\n" % (limit * 16))
    reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]
    expect_closed(s, 2.0)
    s.close()
    # chunked: refused once the body passes the limit
    s = socket.create_connection(live.http, timeout=3)
    s.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (8192, b"\x00" * 8192)
    got = b""
    try:
        for _ in range(limit // 8192 + 4):
            s.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        got = s.recv(4096)
    except ConnectionResetError:
        pass
    assert got.startswith(b"HTTP/1.1 413"), got[:80]
    s.close()
    # the real client library sees the same
    code, _ = wire.post_ocsp(live.http, b"\x30" * (limit + 1))
    assert code == 413


def dribble(addr: wire.Addr, head: bytes, rest: bytes, period: float,
            give_up: float) -> tuple[float | None, bytes]:
    """Send head, then rest one byte per period; (seconds until the server cut us, reply)."""
    s = socket.create_connection(addr, timeout=give_up)
    t = time.monotonic()
    reply = b""
    try:
        s.sendall(head)
        s.setblocking(False)
        for byte in rest:
            if time.monotonic() - t > give_up:
                return None, reply
            try:
                data = s.recv(65536)
                reply += data
                if not data:
                    return time.monotonic() - t, reply
            except BlockingIOError:
                pass
            except ConnectionResetError:
                return time.monotonic() - t, reply
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t, reply
            time.sleep(period)
        return None, reply
    finally:
        s.close()


def ocsp_slow_post(live: Live) -> None:
    """A POST that announces 40 000 bytes (under the limit) and sends 4 per second."""
    deadline = live.config.http.idle_timeout
    head = (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
            b"Content-Length: 40000\r\n\r\n")
    cut, reply = dribble(live.http, head, b"\x30" * 40000, 0.25, deadline + 5)
    assert cut is not None, f"slow POST body never cut (idle_timeout {deadline} s)"
    assert cut < deadline + 2, cut
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:80]


def http_slowloris(live: Live) -> None:
    deadline = live.config.http.idle_timeout
    head = b"GET /ca/rsa-ca.crt HTTP/1.1\r\n"
    rest = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 20) for i in range(400))
    cut, _ = dribble(live.http, head, rest, 0.25, deadline + 5)
    assert cut is not None, f"slowloris headers never cut (idle_timeout {deadline} s)"
    assert cut < deadline + 2, cut


def ldap_slowloris(live: Live) -> None:
    deadline = live.config.ldap.idle_timeout
    pdu = wire.message(1, wire.search_op("c=MO", wire.or_(*[wire.eq("mail", "x" * 50)] * 40)))
    cut, reply = dribble(live.ldap, pdu[:1], pdu[1:], 0.25, deadline + 5)
    assert cut is not None, f"a PDU dribbled byte by byte is never cut (idle_timeout {deadline} s)"
    assert cut < deadline + 2, cut
    notice = wire.parse_pdu(reply)
    assert notice.tag == wire.NOTICE and notice.code == int(ResultCode.UNAVAILABLE)


def idle_connections(live: Live) -> None:
    """300 idle connections on each listener, then a normal request on each within 1 s."""
    socks: list[socket.socket] = []
    try:
        for i in range(300):  # LDAP: 100 per address (the default per-address limit)
            socks.append(socket.create_connection(
                live.ldap, timeout=3, source_address=(f"127.0.0.{10 + i // 100}", 0)))
        for i in range(300):  # HTTP: 100 per address too (the default per-address limit)
            socks.append(socket.create_connection(
                live.http, timeout=3, source_address=(f"127.0.0.{20 + i // 100}", 0)))
        time.sleep(0.3)  # let the reactor accept them all
        fresh_check(live)
        # they really were accepted and are still served: one LDAP and one HTTP of them
        ldap_sock, http_sock = socks[299], socks[599]
        ldap_sock.sendall(wire.message(1, wire.bind_op()))
        assert ldap_sock.recv(100)[:1] == b"\x30"
        http_sock.sendall(b"GET /ca/rsa-ca.crt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert http_sock.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()


CASES: dict[str, Callable[[Live], None]] = {
    "ldap-truncated-pdu": truncated_pdu,
    "ldap-4gib-length": four_gib_length,
    "ldap-filter-nested-10000": nested_filter,
    "ldap-unknown-operation": unknown_operation,
    "ldap-64k-random": random_64k,
    "ocsp-oversize-post": ocsp_oversize_post,
    "ocsp-slow-post": ocsp_slow_post,
    "http-slowloris": http_slowloris,
    "ldap-slowloris": ldap_slowloris,
    "idle-connections-300": idle_connections,
}


@pytest.fixture
def hostile_live(serve: Callable[..., Live]) -> Live:
    # short deadlines so that the slow-client cases finish in seconds
    return serve(ldap={"idle_timeout": 3.0}, http={"idle_timeout": 3.0})


@pytest.mark.parametrize("case", list(CASES))
@pytest_twisted.ensureDeferred
async def test_named_case(hostile_live: Live, case: str) -> None:
    live = hostile_live
    hb = await heartbeat(live)
    try:
        await in_thread(CASES[case], live)
    finally:
        await in_thread(hb.finish)
    await in_thread(fresh_check, live)


# --- connection floods ------------------------------------------------------------------------


def _refused(addr: wire.Addr, source: str) -> bool:
    """True when the server closes a new connection at once (a connection limit)."""
    try:
        with wire.LdapClient(addr, timeout=2, source=source) as c:
            c.request(wire.bind_op())
            return c.read_pdu() is None
    except (ConnectionResetError, BrokenPipeError):
        return True


def _wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    end = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def ldap_flood(live: Live) -> None:
    factory: Any = live.running.services["ldap"]
    held: list[wire.LdapClient] = []
    try:
        for _ in range(5):  # the per-address limit from 127.0.0.1
            c = wire.LdapClient(live.ldap, timeout=2)
            assert c.bind() == 0
            held.append(c)
        for _ in range(20):  # a flood from the same address: each refused at once
            t = time.monotonic()
            assert _refused(live.ldap, "127.0.0.1")
            assert time.monotonic() - t < 1.0
        assert factory.per_address["127.0.0.1"] == 5
        fresh_check(live, source="127.0.0.2")  # another address is served within 1 s
        for i in range(7):  # total limit 12: 5 + 7 from .3
            c = wire.LdapClient(live.ldap, timeout=2, source="127.0.0.3")
            if i < 5:
                assert c.bind() == 0
            held.append(c)
        _wait_until(lambda: factory.connections == 10)
        assert _refused(live.ldap, "127.0.0.3")  # per-address again
        held.append(wire.LdapClient(live.ldap, timeout=2, source="127.0.0.4"))
        held.append(wire.LdapClient(live.ldap, timeout=2, source="127.0.0.4"))
        assert held[-1].bind() == 0
        _wait_until(lambda: factory.connections == 12)
        assert _refused(live.ldap, "127.0.0.5")  # the total limit
        held.pop(0).close()
        _wait_until(lambda: factory.connections == 11)
        with wire.LdapClient(live.ldap, timeout=2, source="127.0.0.5") as c:
            assert c.bind() == 0
    finally:
        for c in held:
            c.close()
    _wait_until(lambda: factory.connections == 0)


@pytest.fixture
def limited_live(serve: Callable[..., Live]) -> Live:
    return serve(ldap={"max_connections_per_address": 5, "max_connections": 12})


@pytest_twisted.ensureDeferred
async def test_ldap_connection_limits_hold(limited_live: Live) -> None:
    await in_thread(ldap_flood, limited_live)


def http_flood(live: Live) -> None:
    """600 connections from 127.0.0.2 (500 of them over its per-address limit)."""
    socks = []
    try:
        for _ in range(600):
            socks.append(socket.create_connection(live.http, timeout=3,
                                                  source_address=("127.0.0.2", 0)))
        time.sleep(0.3)
        fresh_check(live)  # from 127.0.0.1
    finally:
        for s in socks:
            s.close()


@pytest_twisted.ensureDeferred
async def test_http_flood_from_one_address_keeps_answering(live: Live) -> None:
    """600 connections from one address: a new client is still answered within 1 s (what
    is admitted and what refused: test_http_limits.py)."""
    hb = await heartbeat(live)
    try:
        await in_thread(http_flood, live)
    finally:
        await in_thread(hb.finish)


def interrupted_searches(live: Live) -> None:
    """A search followed at once by garbage, or by an unbind: the connection closes while
    its search is still scheduled. No such close may leak a connection slot."""
    factory: Any = live.running.services["ldap"]
    search = wire.message(1, wire.search_op("c=MO", wire.present("objectClass"), ["*"]))
    for tail in (b"\x04\x00garbage", wire.message(2, wire.tlv(0x42, b""))) * 5:
        with wire.LdapClient(live.ldap, timeout=3) as c:
            c.send(search + tail)
            c.read_until_closed(3.0)
    _wait_until(lambda: factory.connections == 0)
    assert not factory.per_address
    for _ in range(3):  # the address still has all its slots
        with wire.LdapClient(live.ldap, timeout=2) as c:
            assert c.bind() == 0


@pytest_twisted.ensureDeferred
async def test_interrupted_searches_leak_no_connection_slot(limited_live: Live) -> None:
    await in_thread(interrupted_searches, limited_live)

"""Connection limits of the HTTP listener (and the shared ``ConnectionLimits``), issue 6.

Against real listeners from one ``app.start`` on 127.0.0.1: the per-address and total limits
hold, a flood from one address does not stop others (nor the connections admitted before
it), slots come back after every way a connection can end — OCSP answers, other routes
on the same connection, server-side cut-offs — and a reload changes the limits for new
connections.
Other loopback addresses (127.0.0.2 …) stand for other clients. No assertion on time: every
wait is a generous upper bound that only turns a hang into a failure.
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogLevel, capturedLogs, formatEvent

from server.limits import ConnectionLimits, Slot
from tests.hostile import wire
from tests.hostile.conftest import Live, in_thread, ocsp_probe

WAIT = 20.0  # upper bound of any wait here (seconds); never a measure of speed
OCSP_HEADERS = {"Content-Type": "application/ocsp-request"}
CA_GET = b"GET /ca/rsa-ca.crt HTTP/1.1\r\nHost: x\r\n\r\n"  # not OCSP: the publication route


# --- ConnectionLimits itself (no sockets) ---------------------------------------------------


class FakeTimer:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal_warnings(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events
            if e.get("log_level") == LogLevel.warn and "refusing" in (e.get("log_format") or "")]


def test_limits_count_refuse_and_release() -> None:
    limits = ConnectionLimits(3, 2, service="http", timer=FakeTimer())
    with capturedLogs():
        assert limits.admit("192.0.2.1") and limits.admit("192.0.2.1")
        assert not limits.admit("192.0.2.1")  # per address
        assert limits.admit("192.0.2.2")
        assert not limits.admit("192.0.2.3")  # in total
    assert (limits.total, dict(limits.per_address), limits.refused) == (
        3, {"192.0.2.1": 2, "192.0.2.2": 1}, 2)
    limits.release("192.0.2.1")
    limits.release("192.0.2.2")
    assert (limits.total, dict(limits.per_address)) == (1, {"192.0.2.1": 1})
    assert limits.admit("192.0.2.3")


def test_limits_warn_once_per_burst() -> None:
    timer = FakeTimer()
    limits = ConnectionLimits(10, 1, service="http", timer=timer, warn_interval=10.0)
    assert limits.admit("192.0.2.1")
    with capturedLogs() as events:
        for _ in range(500):
            assert not limits.admit("192.0.2.1")
        first = refusal_warnings(events)
        timer.now += 10.0  # the next burst
        assert not limits.admit("192.0.2.1")
        both = refusal_warnings(events)
    assert len(first) == 1 and len(both) == 2, both
    assert "per-address limit" in first[0] and "IP=192.0.2.1" in first[0]
    assert "499 more refused since the last warning" in both[1], both[1]
    assert limits.refused == 501


def test_slot_releases_once_and_release_never_goes_negative() -> None:
    limits = ConnectionLimits(10, 10, service="ldap")
    slot = limits.slot("192.0.2.1")
    other = limits.slot("192.0.2.1")
    assert isinstance(slot, Slot) and other is not None and limits.total == 2
    slot.release()
    slot.release()  # a second owner's connectionLost: no effect
    assert limits.total == 1 and limits.per_address["192.0.2.1"] == 1
    other.release()
    with capturedLogs() as events:
        limits.release("192.0.2.1")  # a bug elsewhere: logged, counters stay at 0
    assert limits.total == 0 and not limits.per_address
    assert any(e["log_level"] == LogLevel.error for e in events)


def test_new_limits_apply_to_new_connections() -> None:
    limits = ConnectionLimits(10, 3, service="http")
    for _ in range(3):
        assert limits.admit("192.0.2.1")
    limits.set_limits(10, 1)
    assert limits.per_address["192.0.2.1"] == 3  # open ones stay
    with capturedLogs():
        assert not limits.admit("192.0.2.1")
    limits.release("192.0.2.1")
    limits.release("192.0.2.1")
    limits.release("192.0.2.1")
    assert limits.admit("192.0.2.1")
    with pytest.raises(ValueError):
        limits.set_limits(0, 1)


# --- blocking clients (run in a thread while the reactor serves) ------------------------------


def connect(live: Live, source: str) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(*live.http, timeout=WAIT, source_address=(source, 0))
    conn.connect()
    return conn


def served(conn: http.client.HTTPConnection, live: Live) -> None:
    """One OCSP POST on a kept-alive connection, answered successfully."""
    code, _, body = wire.exchange(conn, "POST", "/ocsp", live.ocsp_der(nonce=False),
                                  OCSP_HEADERS)
    ocsp_probe((code, body))


def open_served(live: Live, source: str) -> http.client.HTTPConnection:
    conn = connect(live, source)
    served(conn, live)  # answered, so the server has admitted it
    return conn


def refused(live: Live, source: str) -> bool:
    """True when the server closes a new connection without answering a request on it."""
    s = socket.create_connection(live.http, timeout=WAIT, source_address=(source, 0))
    try:
        s.sendall(CA_GET)
        return s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        s.close()


def closed_by_server(s: socket.socket) -> None:
    """Read (and drop) until the server closes; fails if it never does within WAIT."""
    s.settimeout(WAIT)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection within {WAIT} s") from None


def wait_until(predicate: Callable[[], bool], what: str | Callable[[], str]) -> None:
    end = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() >= end:
            raise AssertionError(f"not reached within {WAIT} s: "
                                 + (what() if callable(what) else what))
        time.sleep(0.02)


def limits_of(live: Live) -> ConnectionLimits:
    site: Any = live.running.services["http"]
    limits: ConnectionLimits = site.limits
    return limits


def all_released(live: Live) -> None:
    limits = limits_of(live)
    wait_until(lambda: limits.total == 0, f"HTTP slots released ({limits.total} held)")
    assert not limits.per_address, dict(limits.per_address)


# Held connections must not be cut by the idle timeout (3 s in this folder's fixtures) while a
# loaded machine runs a case: here it is long, except in the cut-off case.
PATIENT = 300.0


@pytest.fixture
def limited(serve: Callable[..., Live]) -> Live:
    return serve(http={"max_connections_per_address": 5, "max_connections": 12,
                       "idle_timeout": PATIENT})


@pytest.fixture
def patient(serve: Callable[..., Live]) -> Live:
    """The default connection limits."""
    return serve(http={"idle_timeout": PATIENT})


@pytest.fixture
def release_errors() -> Iterator[Callable[[], list[str]]]:
    """The error lines of the limits (a slot released that was not held) so far."""
    with capturedLogs() as events:
        yield lambda: [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error
                       and "slot" in (e.get("log_format") or "")]


# --- the limits hold -------------------------------------------------------------------------


def per_address_limit(live: Live) -> None:
    limits = limits_of(live)
    held = [open_served(live, "127.0.0.2") for _ in range(5)]
    try:
        for _ in range(10):  # the sixth and later from the same address: closed at once
            assert refused(live, "127.0.0.2")
        assert limits.per_address["127.0.0.2"] == 5  # refused ones never took a slot
        ocsp_probe(wire.post_ocsp(live.http, live.ocsp_der(), timeout=WAIT))  # 127.0.0.1
        for conn in held:  # the admitted ones are still served
            served(conn, live)
        held.pop().close()
        wait_until(lambda: limits.per_address["127.0.0.2"] == 4, "one slot freed")
        held.append(open_served(live, "127.0.0.2"))  # the freed slot is usable again
        assert refused(live, "127.0.0.2")
    finally:
        for conn in held:
            conn.close()
    all_released(live)


@pytest_twisted.ensureDeferred
async def test_per_address_limit_holds(limited: Live) -> None:
    await in_thread(per_address_limit, limited)


def total_limit(live: Live) -> None:
    limits = limits_of(live)
    before = limits.refused
    held = [open_served(live, f"127.0.0.{2 + i // 5}") for i in range(12)]  # 5 + 5 + 2
    try:
        assert limits.total == 12
        assert refused(live, "127.0.0.5")  # a new address, over the total
        assert refused(live, "127.0.0.4")  # under its per-address limit, over the total
        assert limits.refused == before + 2
        held.pop(0).close()
        wait_until(lambda: limits.total == 11, "one slot freed")
        held.append(open_served(live, "127.0.0.5"))
        assert refused(live, "127.0.0.6")
    finally:
        for conn in held:
            conn.close()
    all_released(live)


@pytest_twisted.ensureDeferred
async def test_total_limit_holds(limited: Live) -> None:
    await in_thread(total_limit, limited)


def flood(live: Live, size: int) -> tuple[int, int]:
    """size connections from 127.0.0.2 (default limits), opened while a client from
    127.0.0.1 holds a keep-alive connection; (answered, closed unanswered) among them."""
    per_address = live.config.http.max_connections_per_address
    limits = limits_of(live)
    before = limits.refused
    keep = open_served(live, "127.0.0.1")  # connected before the flood, used after it
    socks: list[socket.socket] = []
    try:
        for _ in range(size):
            socks.append(socket.create_connection(live.http, timeout=WAIT,
                                                  source_address=("127.0.0.2", 0)))
        wait_until(lambda: limits.refused - before == size - per_address,
                   lambda: f"{limits.refused - before} refused, {limits.total} open "
                           f"{dict(limits.per_address)}, limit {per_address}")
        assert limits.per_address["127.0.0.2"] == per_address
        # a new client, and the one connected throughout, are answered
        ocsp_probe(wire.post_ocsp(live.http, live.ocsp_der(), timeout=WAIT))
        served(keep, live)
        answered = unanswered = 0
        post = (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
                b"Content-Length: %d\r\n\r\n" % len(live.ocsp_der(nonce=False))
                + live.ocsp_der(nonce=False))
        for s in socks:
            try:
                s.sendall(post)
                reply = s.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
            if reply.startswith(b"HTTP/1.1 200"):
                answered += 1
            else:
                assert reply == b"", reply[:80]
                unanswered += 1
        return answered, unanswered
    finally:
        for s in socks:
            s.close()
        keep.close()


@pytest_twisted.ensureDeferred
async def test_flood_from_one_address_is_cut_at_its_limit(patient: Live) -> None:
    """400 connections from one address with the default limits: 100 admitted and served,
    300 closed at once, one warning for the whole burst; others are served."""
    live = patient
    limits = limits_of(live)
    limits.warn_interval = 3600.0  # the whole flood is one burst, however slow the machine
    with capturedLogs() as events:
        answered, unanswered = await in_thread(flood, live, 400)
    warnings = refusal_warnings(events)
    per_address = live.config.http.max_connections_per_address
    assert per_address == 100  # the default this case is about
    assert (answered, unanswered) == (per_address, 400 - per_address)
    assert len(warnings) == 1, warnings
    assert "refusing http connections: per-address limit (IP=127.0.0.2" in warnings[0]
    await in_thread(all_released, live)


# --- slots come back, whoever owns the connection ----------------------------------------------


def handover_releases(live: Live) -> None:
    limits = limits_of(live)
    der = live.ocsp_der(nonce=False)
    held = []
    try:
        for _ in range(5):  # OCSP first, then another route on the same connection
            conn = open_served(live, "127.0.0.2")
            code, _, _ = wire.exchange(conn, "GET", "/ca/rsa-ca.crt")
            assert code == 200
            served(conn, live)  # OCSP again on the same connection
            held.append(conn)
        assert limits.per_address["127.0.0.2"] == 5  # one slot each, not two
        assert refused(live, "127.0.0.2")
        held.pop().close()
        wait_until(lambda: limits.per_address["127.0.0.2"] <= 4, "a handed-over slot freed")
        assert limits.per_address["127.0.0.2"] == 4  # freed once
        for conn in held:
            conn.close()
        held.clear()
        all_released(live)
        # the server closes: 413 from the headers, Connection: close, HTTP/1.0
        for request in (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
                        b"GET /ca/rsa-ca.crt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        b"GET /ca/rsa-ca.crt HTTP/1.0\r\n\r\n"):
            with socket.create_connection(live.http, timeout=WAIT,
                                          source_address=("127.0.0.2", 0)) as s:
                s.sendall(request)
                closed_by_server(s)
        all_released(live)
        # connections that only ever asked for OCSP
        conns = [open_served(live, "127.0.0.2") for _ in range(5)]
        assert limits.per_address["127.0.0.2"] == 5
        assert refused(live, "127.0.0.2")
        for conn in conns:
            conn.close()
        all_released(live)
        # answers with Connection: close, and clients that just leave
        for _ in range(5):
            with socket.create_connection(live.http, timeout=WAIT,
                                          source_address=("127.0.0.2", 0)) as s:
                s.sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(der), der))
                closed_by_server(s)
        for _ in range(5):  # a client that leaves without a word, once admitted
            s = socket.create_connection(live.http, timeout=WAIT, source_address=("127.0.0.2", 0))
            wait_until(lambda: limits.total == 1, "the silent connection admitted")
            s.close()
            all_released(live)
        for _ in range(5):  # the address has all its slots
            held.append(open_served(live, "127.0.0.2"))
    finally:
        for conn in held:
            conn.close()
    all_released(live)


@pytest_twisted.ensureDeferred
async def test_slots_released_after_handover(limited: Live,
                                             release_errors: Callable[[], list[str]]) -> None:
    await in_thread(handover_releases, limited)
    assert not release_errors(), release_errors()


def cutoffs_release(live: Live) -> None:
    """Connections the server itself cuts (idle_timeout 3 s here): all slots come back."""
    limits = limits_of(live)
    socks = [socket.create_connection(live.http, timeout=WAIT, source_address=("127.0.0.2", 0))
             for _ in range(6)]
    try:
        # socks[0] stays idle
        socks[1].sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks[2].sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n0")
        for s in socks[3:]:  # answered once first
            s.sendall(CA_GET)
            assert s.recv(12).startswith(b"HTTP/1.1 200")
        # socks[3] stays idle after an answer; a slow request on the other two
        socks[4].sendall(b"GET /ca/rsa-ca.crt HTTP/1.1\r\nHost: x\r\n")
        socks[5].sendall(b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n0")
        wait_until(lambda: limits.per_address["127.0.0.2"] == 6, "all six admitted")
        for s in socks:
            closed_by_server(s)
    finally:
        for s in socks:
            s.close()
    all_released(live)


@pytest_twisted.ensureDeferred
async def test_slots_released_after_idle_and_slow_client_cutoffs(
        live: Live, release_errors: Callable[[], list[str]]) -> None:
    assert live.config.http.idle_timeout == 3.0  # this folder's short cut-offs
    await in_thread(cutoffs_release, live)
    assert not release_errors(), release_errors()


# --- reload ----------------------------------------------------------------------------------


def ldap_refused(live: Live, source: str) -> bool:
    try:
        with wire.LdapClient(live.ldap, timeout=WAIT, source=source) as c:
            c.request(wire.bind_op())
            return c.read_pdu() is None
    except (ConnectionResetError, BrokenPipeError):
        return True


def after_reload(live: Live) -> None:
    limits = limits_of(live)
    ldap: Any = live.running.services["ldap"]
    assert limits.per_address["127.0.0.7"] == 4
    assert refused(live, "127.0.0.7")  # over the new limit (open ones stay)
    new = [open_served(live, "127.0.0.6") for _ in range(2)]
    try:
        assert refused(live, "127.0.0.6")
        with wire.LdapClient(live.ldap, timeout=WAIT, source="127.0.0.6") as a, \
                wire.LdapClient(live.ldap, timeout=WAIT, source="127.0.0.6") as b:
            assert a.bind() == 0 and b.bind() == 0
            assert ldap_refused(live, "127.0.0.6")  # LDAP's new limit too
            assert ldap.per_address["127.0.0.6"] == 2
    finally:
        for conn in new:
            conn.close()


@pytest_twisted.ensureDeferred
async def test_reload_applies_new_limits_to_new_connections(limited: Live) -> None:
    live = limited
    before = [await in_thread(open_served, live, "127.0.0.7") for _ in range(4)]
    try:
        config = live.config
        new = dataclasses.replace(
            config,
            http=dataclasses.replace(config.http, max_connections_per_address=2),
            ldap=dataclasses.replace(config.ldap, max_connections_per_address=2))
        for service in live.running.services.values():  # as serve.py does on SIGHUP
            service.reload(new)
        assert limits_of(live).max_per_address == 2
        await in_thread(after_reload, live)
        for conn in before:  # admitted before the reload: still served
            await in_thread(served, conn, live)
    finally:
        for conn in before:
            conn.close()
    await in_thread(all_released, live)
    ldap: Any = live.running.services["ldap"]
    await in_thread(wait_until, lambda: ldap.connections == 0, "LDAP slots released")

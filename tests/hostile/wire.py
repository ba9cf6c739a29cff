"""Blocking clients for the hostile tests: raw LDAP (BER by hand), HTTP, OCSP requests.

Every call here blocks, so tests run them with ``threads.deferToThread`` while the reactor
serves. Sockets always have a timeout: nothing in this folder can hang a test run.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as c_ocsp

from server.ldap.codec import integer as integer, octets as octets, tlv as tlv  # re-exported

Addr = tuple[str, int]

# --- LDAP requests ----------------------------------------------------------------------------


def message(mid: int, op: bytes, controls: bytes = b"") -> bytes:
    return tlv(0x30, integer(mid) + op + controls)


def bind_op() -> bytes:
    return tlv(0x60, integer(3) + octets("") + tlv(0x80, b""))


def search_op(base: str, filt: bytes, attrs: Sequence[str] = (), scope: int = 2,
              size: int = 0, types_only: bool = False) -> bytes:
    body = (octets(base) + integer(scope, 0x0A) + integer(0, 0x0A) + integer(size)
            + integer(0) + tlv(0x01, b"\xff" if types_only else b"\x00") + filt
            + tlv(0x30, b"".join(octets(a) for a in attrs)))
    return tlv(0x63, body)


def compare_op(dn: str, attr: str, value: bytes | str) -> bytes:
    return tlv(0x6E, octets(dn) + tlv(0x30, octets(attr) + octets(value)))


def eq(attr: str, value: bytes | str) -> bytes:
    return tlv(0xA3, octets(attr) + octets(value))


def present(attr: str) -> bytes:
    return octets(attr, 0x87)


def substr(attr: str, initial: bytes | str | None = None, any_: Sequence[bytes | str] = (),
           final: bytes | str | None = None) -> bytes:
    parts = b""
    if initial is not None:
        parts += octets(initial, 0x80)
    parts += b"".join(octets(a, 0x81) for a in any_)
    if final is not None:
        parts += octets(final, 0x82)
    return tlv(0xA4, octets(attr) + tlv(0x30, parts))


def extensible(rule: str | None, attr: str | None, value: bytes | str, dn: bool = False) -> bytes:
    body = (octets(rule, 0x81) if rule else b"") + (octets(attr, 0x82) if attr else b"")
    body += octets(value, 0x83) + (tlv(0x84, b"\xff") if dn else b"")
    return tlv(0xA9, body)


def and_(*items: bytes) -> bytes:
    return tlv(0xA0, b"".join(items))


def or_(*items: bytes) -> bytes:
    return tlv(0xA1, b"".join(items))


def not_(item: bytes) -> bytes:
    return tlv(0xA2, item)


def nested_not(depth: int, leaf: bytes | None = None) -> bytes:
    """A filter of ``depth`` nested NOTs, built without recursion."""
    out = leaf if leaf is not None else present("objectClass")
    for _ in range(depth):
        out = not_(out)
    return out


# --- LDAP responses ---------------------------------------------------------------------------


def read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the element at pos; ValueError if cut short."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated")
    return tag, pos, pos + length


def children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        t, s, e = read_tlv(data, start)
        out.append((t, s, e))
        start = e
    return out


@dataclass
class Pdu:
    message_id: int
    tag: int
    body: bytes  # the protocolOp content

    @property
    def code(self) -> int:
        """resultCode of an LDAPResult-shaped response."""
        t, s, e = read_tlv(self.body, 0)
        assert t == 0x0A, f"not an LDAPResult: tag 0x{t:02x}"
        return int.from_bytes(self.body[s:e], "big")

    @property
    def text(self) -> str:
        items = children(self.body, 0, len(self.body))
        return self.body[items[2][1]:items[2][2]].decode("utf-8", "replace")

    def entry(self) -> tuple[str, dict[str, list[bytes]]]:
        """(dn, attribute name -> values) of a SearchResultEntry."""
        assert self.tag == 0x64
        (_, ds, de), (_, as_, ae) = children(self.body, 0, len(self.body))
        attrs: dict[str, list[bytes]] = {}
        for _, s, e in children(self.body, as_, ae):
            (_, ns, ne), (_, vs, ve) = children(self.body, s, e)
            name = self.body[ns:ne].decode("utf-8")
            attrs[name] = [self.body[a:b] for _, a, b in children(self.body, vs, ve)]
        return self.body[ds:de].decode("utf-8"), attrs


def parse_pdu(pdu: bytes) -> Pdu:
    _, s, e = read_tlv(pdu, 0)
    (_, ms, me), (op, os_, oe), *_ = children(pdu, s, e)
    return Pdu(int.from_bytes(pdu[ms:me], "big"), op, pdu[os_:oe])


NOTICE = 0x78


@dataclass
class SearchResult:
    code: int
    entries: list[tuple[str, dict[str, list[bytes]]]] = field(default_factory=list)
    text: str = ""


class LdapClient:
    """One LDAP connection; every read has a deadline."""

    def __init__(self, addr: Addr, timeout: float = 5.0, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            addr, timeout=timeout, source_address=(source, 0) if source else None)
        self.timeout = timeout
        self.buf = b""
        self.mid = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> LdapClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, op: bytes, controls: bytes = b"") -> int:
        self.mid += 1
        self.send(message(self.mid, op, controls))
        return self.mid

    def read_pdu(self) -> Pdu | None:
        """The next response PDU; None when the server closed the connection."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                _, _, e = read_tlv(self.buf, 0)
                pdu, self.buf = self.buf[:e], self.buf[e:]
                return parse_pdu(pdu)
            except ValueError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no LDAP response in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def read_until_closed(self, limit: float = 5.0) -> list[Pdu]:
        """Every PDU the server sends until it closes; TimeoutError if it never does."""
        out = []
        end = time.monotonic() + limit
        while True:
            self.timeout = max(0.01, end - time.monotonic())
            pdu = self.read_pdu()
            if pdu is None:
                return out
            out.append(pdu)

    def bind(self) -> int:
        self.request(bind_op())
        pdu = self.read_pdu()
        assert pdu is not None and pdu.tag == 0x61
        return pdu.code

    def search(self, base: str, filt: bytes, attrs: Sequence[str] = (), scope: int = 2,
               size: int = 0, types_only: bool = False) -> SearchResult:
        mid = self.request(search_op(base, filt, attrs, scope, size, types_only))
        result = SearchResult(-1)
        while True:
            pdu = self.read_pdu()
            if pdu is None:
                raise ConnectionError("connection closed during a search")
            assert pdu.message_id == mid, (pdu.message_id, mid, pdu.tag)
            if pdu.tag == 0x64:
                result.entries.append(pdu.entry())
            elif pdu.tag == 0x65:
                result.code, result.text = pdu.code, pdu.text
                return result

    def compare(self, dn: str, attr: str, value: bytes | str) -> int:
        self.request(compare_op(dn, attr, value))
        pdu = self.read_pdu()
        assert pdu is not None and pdu.tag == 0x6F
        return pdu.code


# --- HTTP and OCSP ----------------------------------------------------------------------------


def http_call(addr: Addr, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 5.0
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        return exchange(conn, method, path, body, headers)
    finally:
        conn.close()


def exchange(conn: http.client.HTTPConnection, method: str, path: str,
             body: bytes | None = None, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bool = True) -> bytes:
    b = c_ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def ocsp_status(der: bytes) -> c_ocsp.OCSPResponseStatus:
    return c_ocsp.load_der_ocsp_response(der).response_status


def post_ocsp(addr: Addr, der: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    code, _, body = http_call(addr, "POST", "/ocsp", der,
                         {"Content-Type": "application/ocsp-request"}, timeout)
    return code, body


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t = time.monotonic()
    out = fn(*args, **kw)
    return out, time.monotonic() - t

"""LDAP messages (RFC 4511 §4) as BER: framing, request decoding, response encoding. Pure.

Strategy: requests are decoded by hand into frozen dataclasses, because every check must be a
real check (ldaptor validates with ``assert``, prints unknown tags and recurses without bound):
definite lengths only, every length inside its parent, filter depth and size bounded, strict
UTF-8. Anything else raises ``ProtocolError``, which the protocol turns into a Notice of
Disconnection. ``frame_length`` reads only a PDU's header, so an oversized request is refused
before its body is buffered. Responses are encoded directly (a handful of shapes); the test
suite decodes them with ldaptor's codec to check both agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from server.ldap.errors import ProtocolError
from server.ldap.filters import And, Extensible, Filter, Match, Not, Or, Present, Substrings

NOTICE_OF_DISCONNECTION = "1.3.6.1.4.1.1466.20036"
MAX_INT = 2**31 - 1


class RequestTooLarge(ProtocolError):
    """A PDU whose length header exceeds the configured maximum."""


# --- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    oid: str
    critical: bool
    value: bytes | None


@dataclass(frozen=True)
class BindRequest:
    version: int
    name: str
    method: str  # simple | sasl | other
    password: bytes = b""
    mechanism: str = ""


@dataclass(frozen=True)
class UnbindRequest:
    pass


@dataclass(frozen=True)
class SearchRequest:
    base: str
    scope: int
    deref: int
    size_limit: int
    time_limit: int
    types_only: bool
    filter: Filter
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class WriteRequest:
    """Add, delete, modify or modify DN: decoded only far enough to log and refuse."""

    kind: str  # ADD | DEL | MOD | MODRDN
    dn: str


@dataclass(frozen=True)
class CompareRequest:
    dn: str
    attribute: str
    value: bytes


@dataclass(frozen=True)
class AbandonRequest:
    message_id: int


@dataclass(frozen=True)
class ExtendedRequest:
    name: str
    value: bytes | None


Request = (BindRequest | UnbindRequest | SearchRequest | WriteRequest | CompareRequest
           | AbandonRequest | ExtendedRequest)


@dataclass(frozen=True)
class Message:
    message_id: int
    request: Request
    controls: tuple[Control, ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)  # the PDU it was decoded from


# --- BER reading --------------------------------------------------------------------------


def frame_length(buf: bytes | bytearray, max_bytes: int) -> int | None:
    """Total length of the PDU whose first bytes (6 suffice) are buf; None if incomplete."""
    if not buf:
        return None
    if buf[0] != 0x30:
        raise ProtocolError("not an LDAPMessage")
    if len(buf) < 2:
        return None
    first = buf[1]
    if first < 0x80:
        total = 2 + first
    else:
        n = first & 0x7F
        if n == 0:
            raise ProtocolError("indefinite length")
        if n > 4:
            raise RequestTooLarge("length header too large")
        if len(buf) < 2 + n:
            return None
        total = 2 + n + int.from_bytes(buf[2 : 2 + n], "big")
    if total > max_bytes:
        raise RequestTooLarge(f"request of {total} bytes exceeds {max_bytes}")
    return total


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    if pos + 2 > end:
        raise ProtocolError("truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ProtocolError("multi-byte tag")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise ProtocolError("bad length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise ProtocolError("element longer than its container")
    return tag, pos, pos + length


def _expect(data: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    got, start, stop = _tlv(data, pos, end)
    if got != tag:
        raise ProtocolError(f"expected tag 0x{tag:02x}, got 0x{got:02x}")
    return start, stop


def _int(data: bytes, start: int, stop: int) -> int:
    if not 1 <= stop - start <= 5:
        raise ProtocolError("bad integer")
    return int.from_bytes(data[start:stop], "big", signed=True)


def _bool(data: bytes, start: int, stop: int) -> bool:
    if stop - start != 1:
        raise ProtocolError("bad boolean")
    return data[start] != 0


def _str(data: bytes, start: int, stop: int) -> str:
    try:
        return data[start:stop].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("string is not UTF-8") from exc


def _read_str(data: bytes, pos: int, end: int, tag: int = 0x04) -> tuple[str, int]:
    start, stop = _expect(data, pos, end, tag)
    return _str(data, start, stop), stop


def _read_int(data: bytes, pos: int, end: int, tag: int = 0x02) -> tuple[int, int]:
    start, stop = _expect(data, pos, end, tag)
    return _int(data, start, stop), stop


def decode_message(pdu: bytes, max_depth: int = 100, max_items: int = 1000) -> Message:
    """One LDAPMessage (RFC 4511 §4.1.1); raises ProtocolError on anything malformed."""
    start, end = _expect(pdu, 0, len(pdu), 0x30)
    if end != len(pdu):
        raise ProtocolError("trailing bytes in PDU")
    message_id, pos = _read_int(pdu, start, end)
    if not 0 <= message_id <= MAX_INT:
        raise ProtocolError("bad messageID")
    tag, op_start, op_stop = _tlv(pdu, pos, end)
    controls: tuple[Control, ...] = ()
    if op_stop < end:
        c_start, c_stop = _expect(pdu, op_stop, end, 0xA0)
        if c_stop != end:
            raise ProtocolError("bytes after controls")
        controls = _controls(pdu, c_start, c_stop)
    try:
        request = _request(tag, pdu, op_start, op_stop, max_depth, max_items)
    except ProtocolError as exc:
        exc.message_id = message_id  # type: ignore[attr-defined]
        raise
    return Message(message_id, request, controls, pdu)


def _controls(data: bytes, pos: int, end: int) -> tuple[Control, ...]:
    out = []
    while pos < end:
        start, stop = _expect(data, pos, end, 0x30)
        oid, p = _read_str(data, start, stop)
        critical = False
        value = None
        if p < stop and data[p] == 0x01:
            s, e = _expect(data, p, stop, 0x01)
            critical, p = _bool(data, s, e), e
        if p < stop:
            s, e = _expect(data, p, stop, 0x04)
            value, p = bytes(data[s:e]), e
        if p != stop:
            raise ProtocolError("bad control")
        out.append(Control(oid, critical, value))
        pos = stop
    return tuple(out)


_WRITES = {0x66: "MOD", 0x68: "ADD", 0x6C: "MODRDN"}


def _request(tag: int, d: bytes, pos: int, end: int, max_depth: int, max_items: int) -> Request:
    if tag == 0x63:
        return _search(d, pos, end, max_depth, max_items)
    if tag == 0x60:
        version, p = _read_int(d, pos, end)
        name, p = _read_str(d, p, end)
        auth, s, e = _tlv(d, p, end)
        if e != end:
            raise ProtocolError("bytes after bind credentials")
        if auth == 0x80:
            return BindRequest(version, name, "simple", bytes(d[s:e]))
        if auth == 0xA3:
            mechanism, _ = _read_str(d, s, e)
            return BindRequest(version, name, "sasl", mechanism=mechanism)
        return BindRequest(version, name, "other")
    if tag == 0x42:
        if end != pos:
            raise ProtocolError("unbind with content")
        return UnbindRequest()
    if tag == 0x50:
        return AbandonRequest(_int(d, pos, end))
    if tag == 0x4A:
        return WriteRequest("DEL", _str(d, pos, end))
    if tag in _WRITES:
        dn, _ = _read_str(d, pos, end)
        return WriteRequest(_WRITES[tag], dn)
    if tag == 0x6E:
        dn, p = _read_str(d, pos, end)
        s, e = _expect(d, p, end, 0x30)
        attr, q = _read_str(d, s, e)
        vs, ve = _expect(d, q, e, 0x04)
        if ve != e or e != end:
            raise ProtocolError("bad compare request")
        return CompareRequest(dn, attr, bytes(d[vs:ve]))
    if tag == 0x77:
        name, p = _read_str(d, pos, end, 0x80)
        value = None
        if p < end:
            s, e = _expect(d, p, end, 0x81)
            value, p = bytes(d[s:e]), e
        if p != end:
            raise ProtocolError("bad extended request")
        return ExtendedRequest(name, value)
    raise ProtocolError(f"unknown operation tag 0x{tag:02x}")


def _search(d: bytes, pos: int, end: int, max_depth: int, max_items: int) -> SearchRequest:
    base, p = _read_str(d, pos, end)
    scope, p = _read_int(d, p, end, 0x0A)
    deref, p = _read_int(d, p, end, 0x0A)
    size_limit, p = _read_int(d, p, end)
    time_limit, p = _read_int(d, p, end)
    s, e = _expect(d, p, end, 0x01)
    types_only, p = _bool(d, s, e), e
    if not (0 <= scope <= 2 and 0 <= deref <= 3 and size_limit >= 0 and time_limit >= 0):
        raise ProtocolError("bad search parameters")
    tag, s, e = _tlv(d, p, end)
    budget = [max_items]
    filt = _filter(d, tag, s, e, 1, max_depth, budget)
    s, e = _expect(d, e, end, 0x30)
    if e != end:
        raise ProtocolError("bytes after attribute list")
    attrs = []
    while s < e:
        name, s = _read_str(d, s, e)
        attrs.append(name)
        if len(attrs) > max_items:
            raise ProtocolError("too many attributes")
    return SearchRequest(base, scope, deref, size_limit, time_limit, types_only, filt,
                         tuple(attrs))


_MATCH_OPS = {0xA3: "=", 0xA5: ">=", 0xA6: "<=", 0xA8: "~="}


def _filter(d: bytes, tag: int, pos: int, end: int, depth: int, max_depth: int,
            budget: list[int]) -> Filter:
    if depth > max_depth:
        raise ProtocolError("filter nested too deeply")
    budget[0] -= 1
    if budget[0] < 0:
        raise ProtocolError("filter too large")
    if tag in (0xA0, 0xA1):
        items = []
        while pos < end:
            t, s, e = _tlv(d, pos, end)
            items.append(_filter(d, t, s, e, depth + 1, max_depth, budget))
            pos = e
        return And(tuple(items)) if tag == 0xA0 else Or(tuple(items))
    if tag == 0xA2:
        t, s, e = _tlv(d, pos, end)
        if e != end:
            raise ProtocolError("NOT with more than one filter")
        return Not(_filter(d, t, s, e, depth + 1, max_depth, budget))
    if tag in _MATCH_OPS:
        attr, p = _read_str(d, pos, end)
        s, e = _expect(d, p, end, 0x04)
        if e != end:
            raise ProtocolError("bad attribute value assertion")
        return Match(_MATCH_OPS[tag], attr, bytes(d[s:e]))
    if tag == 0x87:
        return Present(_str(d, pos, end))
    if tag == 0xA4:
        attr, p = _read_str(d, pos, end)
        s, e = _expect(d, p, end, 0x30)
        if e != end or s == e:
            raise ProtocolError("bad substrings filter")
        initial: bytes | None = None
        final: bytes | None = None
        any_: list[bytes] = []
        while s < e:
            t, vs, ve = _tlv(d, s, e)
            value = bytes(d[vs:ve])
            if final is not None or t not in (0x80, 0x81, 0x82) or (
                    t == 0x80 and (initial is not None or any_)):
                raise ProtocolError("bad substrings filter")
            if t == 0x80:
                initial = value
            elif t == 0x81:
                any_.append(value)
            else:
                final = value
            s = ve
        return Substrings(attr, initial, tuple(any_), final)
    if tag == 0xA9:
        fields: dict[int, bytes] = {}
        while pos < end:
            t, s, e = _tlv(d, pos, end)
            if t not in (0x81, 0x82, 0x83, 0x84) or t in fields or (fields and t < max(fields)):
                raise ProtocolError("bad extensible match")
            fields[t] = bytes(d[s:e])
            pos = e
        if 0x83 not in fields or (0x81 not in fields and 0x82 not in fields):
            raise ProtocolError("bad extensible match")
        try:
            rule = fields[0x81].decode("utf-8") if 0x81 in fields else None
            attr = fields[0x82].decode("utf-8") if 0x82 in fields else None
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc
        dn_attrs = 0x84 in fields and fields[0x84] not in (b"", b"\x00")
        return Extensible(rule, attr, fields[0x83], dn_attrs)
    raise ProtocolError(f"unknown filter tag 0x{tag:02x}")


# --- BER writing --------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv_header(tag: int, n: int) -> bytes:
    """The BER tag and definite length of an element of n content octets (X.690 §8.1.3)."""
    if n < 0x80:
        return bytes((tag, n))
    if n < 0x100:
        return bytes((tag, 0x81, n))
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF))
    return bytes((tag,)) + _length(n)


def tlv(tag: int, content: bytes) -> bytes:
    return tlv_header(tag, len(content)) + content


def integer(value: int, tag: int = 0x02) -> bytes:
    return tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def octets(value: bytes | str, tag: int = 0x04) -> bytes:
    return tlv(tag, value.encode("utf-8") if isinstance(value, str) else value)


def _message(message_id: int, op: bytes, controls: bytes = b"") -> bytes:
    return tlv(0x30, integer(message_id) + op + controls)


def encode_controls(controls: Sequence[tuple[str, bool, bytes | None]]) -> bytes:
    if not controls:
        return b""
    body = b""
    for oid, critical, value in controls:
        inner = octets(oid) + (tlv(0x01, b"\xff") if critical else b"")
        inner += octets(value) if value is not None else b""
        body += tlv(0x30, inner)
    return tlv(0xA0, body)


def result_op(tag: int, code: int, matched: str = "", message: str = "", extra: bytes = b"",
              controls: bytes = b"") -> bytes:
    """An LDAPResult-shaped protocolOp (and controls), without the messageID."""
    body = integer(code, 0x0A) + octets(matched) + octets(message) + extra
    return tlv(tag, body) + controls


def encode_result(message_id: int, tag: int, code: int, matched: str = "", message: str = "",
                  extra: bytes = b"", controls: bytes = b"") -> bytes:
    """An LDAPResult-shaped response (bind, search done, modify, ..., compare, extended)."""
    return _message(message_id, result_op(tag, code, matched, message, extra, controls))


def entry_op(dn: str, attributes: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """The protocolOp of a SearchResultEntry (RFC 4511 §4.5.2), without the messageID."""
    parts = []
    for name, values in attributes:
        vals = b"".join([tlv_header(0x04, len(v)) + v for v in
                         (v if isinstance(v, bytes) else v.encode("utf-8") for v in values)])
        inner = octets(name) + tlv_header(0x31, len(vals)) + vals
        parts.append(tlv_header(0x30, len(inner)) + inner)
    attrs = b"".join(parts)
    return tlv(0x64, octets(dn) + tlv(0x30, attrs))


def encode_entry(message_id: int, dn: str, attributes: Sequence[tuple[str, Sequence[bytes]]]
                 ) -> bytes:
    """SearchResultEntry (RFC 4511 §4.5.2)."""
    return _message(message_id, entry_op(dn, attributes))


def encode_extended(message_id: int, code: int, message: str = "", name: str | None = None,
                    value: bytes | None = None) -> bytes:
    """ExtendedResponse (RFC 4511 §4.12)."""
    extra = (octets(name, 0x8A) if name is not None else b"") + (
        octets(value, 0x8B) if value is not None else b"")
    return encode_result(message_id, 0x78, code, "", message, extra)


def notice_of_disconnection(code: int, message: str) -> bytes:
    """Unsolicited notification (RFC 4511 §4.4.1), messageID 0."""
    return encode_extended(0, code, message, NOTICE_OF_DISCONNECTION)


def paged_value(size: int, cookie: bytes) -> bytes:
    """realSearchControlValue of the paged results control (RFC 2696)."""
    return tlv(0x30, integer(size) + octets(cookie))


def decode_paged_value(value: bytes | None) -> tuple[int, bytes]:
    """(size, cookie) of a paged results request control; ProtocolError when malformed."""
    if value is None:
        raise ProtocolError("paged results control without a value")
    s, e = _expect(value, 0, len(value), 0x30)
    if e != len(value):
        raise ProtocolError("bad paged results control")
    size, p = _read_int(value, s, e)
    cs, ce = _expect(value, p, e, 0x04)
    if ce != e or size < 0:
        raise ProtocolError("bad paged results control")
    return size, bytes(value[cs:ce])

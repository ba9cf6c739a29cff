"""HTTP/1.1 on the wire, sans-IO: bytes in → requests or a refusal; a response → bytes.

Strategy: one ``Connection`` per TCP connection is fed the bytes as they arrive and returns
the requests they complete, in order, and at most one ``Refusal`` (after which the
connection is closed and nothing more is parsed). Everything about the wire is decided
here, once: framing (``Content-Length`` or chunked bodies; never a body on GET/HEAD without
one), the limits (head size → 431, a body announced or grown over ``max_body`` → 413 before
the rest is read, malformed syntax → 400, unsupported transfer codings → 501), persistence
(HTTP/1.1 keep-alive unless ``Connection: close``; HTTP/1.0 only with ``Connection:
keep-alive``; HTTP/1.2 and later minor versions are HTTP/1.1, RFC 9112 §2.3), and how a response is framed (status line in the request's version,
``Connection`` when it differs from the version's default, ``Date``, always
``Content-Length``, no body for HEAD or 304). Nothing here knows sockets, clocks (the Date
value is passed in) or routes; the listener (``server.http.listener``) is the thin
Twisted side. The parser is hand-written for the request shapes HTTP clients send: the
measurement that chose it over httptools (llhttp) is in docs/performance.md.

Pipelining needs nothing special: ``feed`` parses every complete request in the buffer and
keeps the rest; the listener answers them in order. A request after one that ends the
connection (``Connection: close``) is not parsed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

MAX_HEAD: Final = 16_384  # bytes of request line + headers (431 above)
MAX_HEADERS: Final = 100  # header lines (431 above)
MAX_CHUNK_LINE: Final = 1024  # a chunk-size line (with extensions) longer than this: 400

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A well-formed head in one match (RFC 9112 §3, §5): anything else takes the slow path,
# which says what is wrong. Field values: no NUL, CR or LF (bare ones are refused).
_HEAD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) (HTTP/1\.[01])"
                   rb"((?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*)*)")
_FIELD = re.compile(rb"\r\n([^:]+):([^\r]*)")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
_METHODS_WITH_BODY = frozenset((b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
REASONS: Final = {
    100: b"Continue", 200: b"OK", 304: b"Not Modified", 400: b"Bad Request",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Payload Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


class Request:
    """One complete request: method, path (query split off), version, headers, body."""

    __slots__ = ("method", "path", "query", "version", "headers", "body", "keep_alive")

    def __init__(self, method: bytes, path: bytes, query: bytes | None, version: bytes,
                 headers: dict[bytes, bytes], body: bytes, keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version  # b"HTTP/1.1" or b"HTTP/1.0"
        self.headers = headers  # lower-case names; repeated headers joined with ", "
        self.body = body
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return (f"Request({self.method!r}, {self.path!r}, {self.version!r}, "
                f"keep_alive={self.keep_alive}, body={len(self.body)} bytes)")


class Refusal:
    """The connection's last event: answer ``status`` (with ``reason`` in the log) and close."""

    __slots__ = ("status", "reason")

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Refusal) and other.status == self.status
                and other.reason == self.reason)

    def __hash__(self) -> int:
        return hash((self.status, self.reason))


Event = Request | Refusal


class _Refuse(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.refusal = Refusal(status, reason)


class Connection:
    """The request side of one HTTP/1.x connection."""

    __slots__ = ("max_body", "max_head", "_buf", "_done", "_chunked", "_continue", "_continued")

    def __init__(self, max_body: int, max_head: int = MAX_HEAD) -> None:
        self.max_body = max_body
        self.max_head = max_head
        self._buf = b""
        self._done = False  # a refusal or a closing request was parsed: ignore the rest
        # a chunked body in progress: (request, its chunks so far, their total size)
        self._chunked: tuple[Request, list[bytes], int] | None = None
        self._continue = False  # a 100 Continue is due for the request being received
        self._continued = False  # ... and was already asked for

    @property
    def partial(self) -> bool:
        """Whether part of a request has arrived (the listener's slow-client deadline)."""
        return (bool(self._buf) or self._chunked is not None) and not self._done

    @property
    def fresh(self) -> bool:
        """Whether the next byte starts a new request (nothing buffered, not closed): then the
        same bytes always parse the same way."""
        return not self._buf and self._chunked is None and not self._done

    @property
    def closed(self) -> bool:
        """Whether the connection ends after the requests parsed so far."""
        return self._done

    def want_continue(self) -> bool:
        """Once per request: whether its client waits for ``100 Continue`` before the body."""
        due, self._continue = self._continue, False
        if due:
            self._continued = True
        return due

    def feed(self, data: bytes) -> list[Event]:
        """The requests (and at most one final refusal) completed by data."""
        if self._done:
            return []
        buf = self._buf + data if self._buf else data
        out: list[Event] = []
        pos = 0
        size = len(buf)
        try:
            while pos < size and not self._done:
                if self._chunked is not None:
                    end = self._chunk(buf, pos, out)
                else:
                    end = self._head(buf, pos, out)
                if end < 0:  # more bytes needed from -end - 1 on
                    pos = -end - 1
                    break
                pos = end
        except _Refuse as exc:
            self._done = True
            self._buf = b""
            out.append(exc.refusal)
            return out
        self._buf = b"" if self._done else (buf[pos:] if pos else buf)
        return out

    def _head(self, buf: bytes, pos: int, out: list[Event]) -> int:
        """Parse one request starting at pos: the position after it, or -pos - 1 when the
        request is not complete yet."""
        while buf.startswith(b"\r\n", pos):  # RFC 9112 §2.2: empty lines before a request
            pos += 2
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            rest = buf[pos:]
            if len(rest) > self.max_head:
                raise _Refuse(431, "request head over %d bytes" % self.max_head)
            if rest.count(b"\n") != rest.count(b"\r\n"):
                raise _Refuse(400, "bare LF line ending")
            return -pos - 1
        if end - pos > self.max_head:
            raise _Refuse(431, "request head over %d bytes" % self.max_head)
        head = buf[pos:end]
        m = _HEAD.fullmatch(head)
        if m is None:
            method, target, version, headers = _slow_head(head)
        else:
            method, target, version, fields = m.groups()
            pairs = _FIELD.findall(fields) if fields else []
            if len(pairs) > MAX_HEADERS:
                raise _Refuse(431, "more than %d header lines" % MAX_HEADERS)
            headers = {n.lower(): v.strip(b" \t") for n, v in pairs}
            if len(headers) != len(pairs):
                headers = _merge(pairs)
        if target[0] != 47:  # "/"
            target = _origin_form(target)
        q = target.find(b"?")
        if q >= 0:
            path, query = target[:q], target[q + 1:]
        else:
            path, query = target, None
        return self._body(buf, pos, end + 4, method, path, query, version, headers, out)

    def _body(self, buf: bytes, begin: int, start: int, method: bytes, path: bytes,
              query: bytes | None,
              version: bytes, headers: dict[bytes, bytes], out: list[Event]) -> int:
        connection = headers.get(b"connection")
        if version == b"HTTP/1.1":
            keep = connection is None or b"close" not in _tokens(connection)
        else:
            keep = connection is not None and b"keep-alive" in _tokens(connection)
        coding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        if coding is not None:
            if length is not None:  # RFC 9112 §6.3: a request smuggling signature
                raise _Refuse(400, "both Content-Length and Transfer-Encoding")
            if version != b"HTTP/1.1" or _tokens(coding) != [b"chunked"]:
                raise _Refuse(501, "unsupported Transfer-Encoding")
            request = Request(method, path, query, version, headers, b"", keep)
            self._chunked = (request, [], 0)
            self._expect(headers)
            return start
        n = 0
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                raise _Refuse(400, "malformed Content-Length")
            n = int(length)
            if n > self.max_body:
                raise _Refuse(413, "body over max_request_bytes")
        if n:
            if start + n > len(buf):
                self._expect(headers)
                return -begin - 1
            body = buf[start:start + n]
        else:
            body = b""
        self._continue = self._continued = False
        out.append(Request(method, path, query, version, headers, body, keep))
        if not keep:
            self._done = True
        return start + n

    def _expect(self, headers: dict[bytes, bytes]) -> None:
        expect = headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not self._continued:
            self._continue = True

    def _chunk(self, buf: bytes, pos: int, out: list[Event]) -> int:
        """Parse chunks of the body in progress (RFC 9112 §7.1): the position after the
        body, or -pos - 1 (pos: the first byte not yet consumed) when more is needed."""
        assert self._chunked is not None
        request, parts, received = self._chunked
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > MAX_CHUNK_LINE:
                    raise _Refuse(400, "malformed chunk size")
                self._chunked = (request, parts, received)
                return -pos - 1
            size_text = buf[pos:eol].split(b";", 1)[0].strip(b" \t")
            try:
                if not size_text or len(size_text) > 16 or size_text[:1] in (b"+", b"-"):
                    raise ValueError
                size = int(size_text, 16)
            except ValueError:
                raise _Refuse(400, "malformed chunk size") from None
            if size == 0:
                if buf.startswith(b"\r\n", eol + 2):
                    end = eol
                else:
                    end = buf.find(b"\r\n\r\n", eol)
                if end < 0 or eol + 2 > len(buf):  # trailer fields still to come
                    if len(buf) - eol > self.max_head:
                        raise _Refuse(431, "chunked trailer over %d bytes" % self.max_head)
                    self._chunked = (request, parts, received)
                    return -pos - 1
                request.body = b"".join(parts)
                self._chunked = None
                self._continue = self._continued = False
                out.append(request)
                if not request.keep_alive:
                    self._done = True
                return end + 4
            if received + size > self.max_body:
                raise _Refuse(413, "body over max_request_bytes")
            if eol + 4 + size > len(buf):
                self._chunked = (request, parts, received)
                return -pos - 1
            if buf[eol + 2 + size:eol + 4 + size] != b"\r\n":
                raise _Refuse(400, "malformed chunk")
            parts.append(buf[eol + 2:eol + 2 + size])
            received += size
            pos = eol + 4 + size


def _merge(pairs: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Header fields with repeated names: joined with ", " (RFC 9110 §5.3), except the ones
    that must not repeat."""
    headers: dict[bytes, bytes] = {}
    for name, value in pairs:
        name = name.lower()
        value = value.strip(b" \t")
        if name in headers:
            if name == b"content-length" or name == b"host":
                if headers[name] != value or name == b"host":
                    raise _Refuse(400, "repeated %s header" % name.decode())
                continue
            headers[name] = headers[name] + b", " + value
        else:
            headers[name] = value
    return headers


def _slow_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, bytes]]:
    """A head the one-match parse refused: what is wrong with it, as a refusal."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf:
        raise _Refuse(400, "bare LF line ending")
    if head.count(b"\r") != crlf:
        raise _Refuse(400, "bare CR in the request head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        if len(parts) == 2:
            raise _Refuse(400, "HTTP/0.9 request")
        raise _Refuse(400, "malformed request line")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if (not version.startswith(b"HTTP/") or len(version) != 8
                or not version[5:6].isdigit() or version[6:7] != b"." or not version[7:].isdigit()):
            raise _Refuse(400, "malformed request line")
        if version[5:6] != b"1":  # HTTP/2 and later speak another framing; 0.x never existed
            raise _Refuse(505, "HTTP version not supported")
        # RFC 9112 §2.3: a later minor version of HTTP/1 is processed as the highest we
        # implement, 1.1 (and answered in 1.1, RFC 9110 §2.5)
        version = b"HTTP/1.1"
    if not method or _TOKEN.match(method) is None:
        raise _Refuse(400, "malformed method")
    if not target or _TARGET_BAD.search(target) is not None:
        raise _Refuse(400, "malformed request target")
    if len(lines) > MAX_HEADERS + 1:
        raise _Refuse(431, "more than %d header lines" % MAX_HEADERS)
    pairs = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.match(name) is None:
            if line[:1] in (b" ", b"\t"):
                raise _Refuse(400, "obsolete header line folding")
            raise _Refuse(400, "malformed header line")
        if b"\x00" in value:
            raise _Refuse(400, "NUL in a header value")
        pairs.append((name, value))
    return method, target, version, _merge(pairs)


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",")]


def _origin_form(target: bytes) -> bytes:
    """The path of an absolute-form target (RFC 9112 §3.2.2), else a refusal."""
    lower = target[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        rest = target[target.find(b"//") + 2:]
        slash = rest.find(b"/")
        return rest[slash:] if slash >= 0 else b"/"
    if target == b"*":
        return target
    raise _Refuse(400, "malformed request target")


# --- responses -----------------------------------------------------------------------------

def status_line(version: bytes, status: int) -> bytes:
    return b"%s %d %s\r\n" % (version, status, REASONS.get(status, b"Unknown"))


def connection_header(version: bytes, keep_alive: bool) -> bytes:
    """The Connection header a response needs (empty when the version's default applies)."""
    if version == b"HTTP/1.1":
        return b"" if keep_alive else b"Connection: close\r\n"
    return b"Connection: keep-alive\r\n" if keep_alive else b""


def response(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, *,
             version: bytes, keep_alive: bool, date: bytes, head: bool = False) -> bytes:
    """One complete response: always Content-Length (never chunked: GnuTLS' ocsptool reads
    replies naively), no body for HEAD or 304 (RFC 9110 §9.3.2, §15.4.5)."""
    parts = [status_line(version, status), connection_header(version, keep_alive),
             b"Date: ", date, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if status == 304:
        parts.append(b"\r\n")
        return b"".join(parts)
    parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
    if not head:
        parts.append(body)
    return b"".join(parts)


def refusal(refused: Refusal, date: bytes) -> bytes:
    """The response to a refusal: a short text body, and the connection closes."""
    body = refused.reason.encode() + b"\n"
    return response(refused.status, [(b"Content-Type", b"text/plain; charset=utf-8")], body,
                    version=b"HTTP/1.1", keep_alive=False, date=date)


CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

"""HTTP request parsing for the responder (issue 12): the hand-written ``server.http.wire``
against ``httptools`` (llhttp, in C), CPU µs per request.

Usage: python bench/http_parse_bench.py [-n 200000] [--rounds 5]

Both parsers do the same job: bytes of one connection in → complete requests (method, path,
query, version, headers as a lower-cased dict, body, keep-alive) out, so that a route can
answer them. httptools calls back into Python per URL, header name, header value, body part
and message boundary; the hand-written parser does one regex match for a well-formed head,
one ``findall`` for its fields and builds the dict in a comprehension. The requests are the
shapes OCSP clients send (wrk's GET and POST as in bench/ocsp_bench.py, ``openssl ocsp``'s
HTTP/1.0 POST, a browser's GET with its usual headers), each fed as one read, and four of
them pipelined in one read. Prints the median over the rounds; needs ``pip install
httptools`` for the second column (skipped without it). Never asserts on time.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.http.wire import Connection, Request  # noqa: E402

DER = bytes.fromhex("304330413f303d300906052b0e03021a05000414") + b"\x11" * 20 + b"\x04\x14" \
    + b"\x22" * 20 + b"\x02\x04\x00\x00\x10\x00"
GET_PATH = b"/" + urllib.parse.quote(base64.b64encode(DER).decode(), safe="").encode()
REQUESTS = {
    "wrk GET": b"GET " + GET_PATH + b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    "wrk POST": (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
                 b"Content-Type: application/ocsp-request\r\n\r\n" % len(DER) + DER),
    "openssl ocsp POST": (b"POST / HTTP/1.0\r\nContent-Type: application/ocsp-request\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(DER) + DER),
    "browser GET": (b"GET " + GET_PATH + b" HTTP/1.1\r\nHost: ocsp.example.org\r\n"
                    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 "
                    b"Firefox/128.0\r\nAccept: */*\r\nAccept-Language: en-US,en;q=0.5\r\n"
                    b"Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n"
                    b"Pragma: no-cache\r\nCache-Control: no-cache\r\n\r\n"),
}
REQUESTS["4 pipelined POSTs"] = REQUESTS["wrk POST"] * 4


class HttptoolsConnection:
    """The same events as ``wire.Connection.feed`` from httptools' callbacks."""

    def __init__(self, max_body: int) -> None:
        import httptools

        self.max_body = max_body
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[Request] = []
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        old = self._headers.get(name)
        self._headers[name] = value if old is None else old + b", " + value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self.parser
        url = self._url
        q = url.find(b"?")
        path, query = (url, None) if q < 0 else (url[:q], url[q + 1:])
        self.out.append(Request(p.get_method(), path, query,
                                b"HTTP/" + p.get_http_version().encode(), self._headers,
                                b"".join(self._body), p.should_keep_alive()))

    def feed(self, data: bytes) -> list[Request]:
        self.parser.feed_data(data)
        out, self.out = self.out, []
        return out


def measure(make: Any, data: bytes, n: int) -> float:
    expected = data.count(b" HTTP/1.")
    assert len(make(65_536).feed(data)) == expected, "parser disagrees on the request count"
    if b"HTTP/1.0\r\n" in data:  # the connection closes after it: a new parser each time
        started = time.process_time()
        for _ in range(n):
            make(65_536).feed(data)
    else:
        feed = make(65_536).feed
        started = time.process_time()
        for _ in range(n):
            feed(data)
    return (time.process_time() - started) / (n * expected) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import httptools

        parsers: dict[str, Any] = {"wire (hand-written)": Connection,
                                   f"httptools {httptools.__version__}": HttptoolsConnection}
    except ImportError:
        print("httptools is not installed: only the hand-written parser is measured")
        parsers = {"wire (hand-written)": Connection}
    print("| request | " + " | ".join(f"{p} µs/request" for p in parsers) + " |")
    print("|---|" + "---|" * len(parsers))
    for name, data in REQUESTS.items():
        row = []
        for make in parsers.values():
            row.append(statistics.median(measure(make, data, args.n)
                                         for _ in range(args.rounds)))
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()

"""The floor of the OCSP benchmark: the smallest Twisted program that answers HTTP requests.

Usage: python bench/ocsp_floor.py PORT GET_RESPONSE POST_RESPONSE [--direct]

It answers every request with fixed bytes read at start — the complete HTTP response certpub
sent to the benchmark's GET and POST (status line, headers, DER) — one ``transport.write`` per
request, with no parsing beyond telling GET from POST and counting request lines. What it
costs per answer is the reactor's own cost (the socket read, the write, the event loop): the
benchmark measures it in the same rotation as certpub, nginx and ``openssl ocsp``.

``--direct`` (the benchmark's ``floor-direct`` target) sends the answer straight to the
socket while the transport has nothing buffered, as certpub's listener does
(``server.twistedwrite.socket_writer``): the floor of that write path, so that certpub's own
cost per answer can be read against both.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class Floor(Protocol):
    def dataReceived(self, data: bytes) -> None:
        n = data.count(b" HTTP/1.") or 1
        answer = GET if data[:3] == b"GET" else POST
        self.transport.write(answer * n if n > 1 else answer)


class DirectFloor(Protocol):
    def dataReceived(self, data: bytes) -> None:
        n = data.count(b" HTTP/1.") or 1
        answer = GET if data[:3] == b"GET" else POST
        if n > 1:
            answer = answer * n
        t = self.transport
        if not t.dataBuffer and not t._tempDataBuffer:
            try:
                sent = t.socket.send(answer)
            except OSError:
                sent = 0
            if sent == len(answer):
                return
            answer = answer[sent:]
        t.write(answer)


class FloorFactory(Factory):
    protocol = Floor
    noisy = False


if __name__ == "__main__":
    port = int(sys.argv[1])
    GET = Path(sys.argv[2]).read_bytes()
    POST = Path(sys.argv[3]).read_bytes()
    if sys.argv[4:] == ["--direct"]:
        FloorFactory.protocol = DirectFloor  # type: ignore[assignment]
    reactor.listenTCP(port, FloorFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]

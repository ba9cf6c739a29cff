"""The one cache of ready answers and its views: a revocation seen on the change feed reaches
every layer that holds the answer (the response cache, the route's hot GET and POST tables,
the listener's memo of whole reads), on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from cryptography.x509 import ocsp as c_ocsp
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from server.feed import ChangeFeed
from server.http.listener import http_date
from server.http.site import make_http_factory
from server.ocsp.cache import raw_key
from store import open_store
from store.model import CaId, RevocationReason, Serial
from tests.ocsp.helpers import WallClock, answer, config_for, fill_store, make_ca, request_der

ADDR = IPv4Address("TCP", "127.0.0.1", 40001)
GOOD, REVOKED = c_ocsp.OCSPCertStatus.GOOD, c_ocsp.OCSPCertStatus.REVOKED


def statuses(data: bytes) -> list[c_ocsp.OCSPCertStatus]:
    out = []
    for part in data.split(b"HTTP/1.1 200 OK\r\n")[1:]:
        head, _, rest = part.partition(b"\r\n\r\n")
        n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        out.append(c_ocsp.load_der_ocsp_response(rest[:n]).certificate_status)
    return out


def test_a_revocation_reaches_every_layer_holding_the_answer(tmp_path: Path,
                                                             store_location: str) -> None:
    clock = WallClock()
    ca = make_ca(tmp_path / "pki", "layers", kind="ed25519", at=clock.now)
    for serial in (1, 2):
        ca.subscriber(serial)
    store = open_store(store_location)
    try:
        ca_id = fill_store(store, ca, clock.now - timedelta(seconds=30))
        factory = make_http_factory(config_for(ca), store, None, clock, Clock())
        factory.access.reactor = None
        service, route = factory.service, factory.http_site.ocsp
        feed = ChangeFeed(store)
        feed.prime()
        feed.subscribe(service.on_changes)
        der = request_der(ca, [2])
        path = b"/ocsp/" + quote(base64.b64encode(der).decode(), safe="").encode()
        post = (b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(der)
                + der)
        get = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        proto = factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        for read in (post, get, post, get, post, get):  # signed, then hot, then remembered
            proto.dataReceived(read)
        assert statuses(transport.value()) == [GOOD] * 6

        # every layer holds the answer: the cache, the hot tables, the listener's memo
        assert service.cache.peek(raw_key(der), clock.now) is not None
        assert der in route._post_hot and path in route._get_hot
        assert post in factory.memo and get in factory.memo
        views = [factory.memo[post][0], factory.memo[get][0]]
        assert all(view(http_date()) is not None for view in views)  # live: they serve

        now = clock.now
        with store.batch(now) as b:  # the importer revokes certificate 2 and commits
            b.revoke(CaId(ca_id), Serial(2), now, RevocationReason.KEY_COMPROMISE, "t", "t")
        feed.poll()  # the commit is seen

        # no layer serves the old answer any more ...
        assert service.cache.peek(raw_key(der), now) is None
        assert all(view(http_date()) is None for view in views)  # the listener's memo
        for table, key in ((route._post_hot, der), (route._get_hot, path)):
            assert table[key].serve((b"HTTP/1.1", True, False, False), http_date()) is None
        # ... and every way in answers "revoked": the service's call, and the wire (first
        # through the dead views, then through the views made anew), again and again
        assert answer(service, der).statuses == ("revoked",)
        transport.clear()
        for read in (post, get) * 3:
            proto.dataReceived(read)
        assert statuses(transport.value()) == [REVOKED] * 6
        assert answer(service, request_der(ca, [2], nonce=b"n" * 16)).statuses == ("revoked",)
    finally:
        store.close()

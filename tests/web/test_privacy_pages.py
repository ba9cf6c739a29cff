"""The lookup policy on the search pages and the JSON API (real listener, urllib): a name
prefix too short is refused in the page's language, a loop over prefixes is throttled with
429 and Retry-After while lookups by e-mail address go on, and the refusals are counted."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import reactor

from server import app
from tests.web.test_listener import _config, get, served_pki  # noqa: F401 - a fixture


def _privacy(config: Any, **settings: Any) -> Any:
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **settings))


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threads2"])
@pytest_twisted.ensureDeferred
async def test_short_names_are_refused_and_a_prefix_loop_is_throttled(
        served_pki: Any, threads: int) -> None:  # noqa: F811 - the fixture
    pki, config = served_pki
    config = _privacy(_config(config, threads), budget=6, budget_per_minute=1, network_budget=0)
    # the refusal counter is read on the public port: allow it there, as an operator may
    config = dataclasses.replace(config, ops=dataclasses.replace(
        config.ops, public_networks=(ipaddress.ip_network("127.0.0.0/8"),)))
    running = await app.start(config, reactor, lambda: datetime.now(UTC))
    try:
        host, port = running.address("http")
        base = f"http://{host}:{port}"
        # too short: 400 naming the policy, in JSON and on the page in each language
        status, body, _ = await get(base, "/api/v1/search?q=ch")
        assert status == 400 and json.loads(body)["error"]["code"] == "privacy_short"
        for lang, words in (("en", "For privacy"), ("pt", "privacidade"), ("zh-Hant", "私隱")):
            status, body, _ = await get(base, f"/?q=ch&lang={lang}")
            assert status == 400 and words in body.decode(), lang
        # a serial spelled as hex still runs when its name reading is too short
        status, _, _ = await get(base, "/api/v1/search?q=ab")
        assert status == 200
        # the loop over prefixes: rows cost, then 429 with Retry-After
        statuses = []
        for prefix in ("joa", "mar", "ant", "ine", "jos", "ana", "lui", "con", "ser", "bea"):
            status, body, headers = await get(base, "/api/v1/search?q=" + quote(prefix))
            statuses.append(status)
            if status == 429:
                assert int(headers["Retry-After"]) > 0
                assert json.loads(body)["error"]["code"] == "privacy_budget"
                break
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        status, body, headers = await get(base, "/?q=mar&lang=zh-Hant")
        assert status == 429 and "秒後再試" in body.decode() and headers["Retry-After"]
        # a lookup by e-mail address shows no address the client lacked: never throttled
        mail = next(c for c in pki.certs if c.emails).emails[0]
        status, body, _ = await get(base, "/api/v1/search?q=" + quote(mail))
        assert status == 200 and json.loads(body)["total"] >= 1
        status, body, _ = await get(base, "/metrics")
        text = body.decode()
        assert 'certpub_privacy_refusals_total{protocol="http",reason="budget"} 2.0' in text
        assert 'certpub_privacy_refusals_total{protocol="http",reason="too_short"} 4.0' in text
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_exact_mode_refuses_name_searches_and_exempt_networks_are_not_judged(
        served_pki: Any) -> None:  # noqa: F811 - the fixture
    _, config = served_pki
    config = _privacy(_config(config, 0), lookups="exact")
    running = await app.start(config, reactor, lambda: datetime.now(UTC))
    try:
        host, port = running.address("http")
        status, body, _ = await get(f"http://{host}:{port}", "/api/v1/search?q=maria")
        assert status == 403 and json.loads(body)["error"]["code"] == "privacy_exact"
    finally:
        await running.stop()
    config = _privacy(config, exempt=("127.0.0.0/8",))
    running = await app.start(config, reactor, lambda: datetime.now(UTC))
    try:
        host, port = running.address("http")
        status, body, _ = await get(f"http://{host}:{port}", "/api/v1/search?q=m")
        assert status == 200 and json.loads(body)["total"] > 0
    finally:
        await running.stop()

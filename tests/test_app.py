"""The composition root: both listeners from one config, /healthz and /metrics, the start line."""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet import threads as threads_
from twisted.logger import capturedLogs

from server import app
from server.config import load_config
from importer.run import import_openssl, import_paths


def _get(url: str) -> tuple[int, bytes, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def _ldap_mail_search(host: str, port: int, mail: str) -> list[Any]:
    import ldap3

    conn = ldap3.Connection(ldap3.Server(host, port=port, get_info=ldap3.NONE), auto_bind=True,
                            receive_timeout=30)
    try:
        conn.search("c=MO", f"(mail={mail})", attributes=["userCertificate;binary"])
        return [r["raw_attributes"]["userCertificate;binary"] for r in conn.response]
    finally:
        conn.unbind()


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threads2"])
@pytest_twisted.ensureDeferred
async def test_start_serves_health_metrics_and_logs_a_summary(tmp_path: Path,
                                                              threads: int) -> None:
    from server.demo.pki import build_demo_pki
    from server.storeaccess import ThreadStore

    pki = build_demo_pki(tmp_path / "pki")
    config = load_config(pki.config_path)
    config = dataclasses.replace(
        config,
        ldap=dataclasses.replace(config.ldap, listen=("tcp:0:interface=127.0.0.1",)),
        http=dataclasses.replace(config.http, listen=("tcp:0:interface=127.0.0.1",)),
        store=dataclasses.replace(config.store, threads=threads),
        ops=dataclasses.replace(config.ops, listen=("tcp:0:interface=127.0.0.1",)),
    )
    now = lambda: datetime.now(UTC)  # noqa: E731
    import_openssl(config, now=now, progress=None)
    import_paths(config, [ca.crl_path for ca in pki.cas.values() if ca.crl_path], now=now,
                 progress=None)
    switch = sys.getswitchinterval()
    with capturedLogs() as events:
        running = await app.start(config, reactor, now)
    ldap_host, ldap_port = running.address("ldap")
    assert isinstance(running.access.store, ThreadStore) == (threads > 0)
    # store threads get the GIL handed back to the reactor sooner than CPython's 5 ms
    assert sys.getswitchinterval() == (app.STORE_THREADS_SWITCH_INTERVAL if threads else switch)
    sys.setswitchinterval(switch)
    try:
        good = next(c for c in pki.certs if c.state == "good" and c.emails)
        found = await threads_.deferToThread(_ldap_mail_search, ldap_host, ldap_port,
                                             good.emails[0])
        assert found and all(values for values in found)
        host, port = running.address("http")
        ops_host, ops_port = running.address("ops")
        status, body, headers = await threads_.deferToThread(
            _get, f"http://{ops_host}:{ops_port}/healthz")
        assert status == 200, body
        health = json.loads(body)
        assert health["status"] == "ok" and health["generation"] >= 1
        assert set(health["signer_days_left"]) == {"rsa-ca", "ec-ca"}
        status, body, headers = await threads_.deferToThread(
            _get, f"http://{ops_host}:{ops_port}/metrics")
        assert status == 200 and b"certpub_store_generation" in body
        assert b'certpub_certificates{ca="rsa-ca",status="revoked"}' in body
        assert b'certpub_requests_total{operation="search",protocol="ldap",result="success"}' in body
        # the public port refuses the staff-only paths by default (no [ops] public_networks)
        for path in ("/metrics", "/healthz"):
            status, body, _ = await threads_.deferToThread(_get, f"http://{host}:{port}{path}")
            assert status == 404 and b"certpub_" not in body and b"signer" not in body
        # the OCSP site answers on the public port, and only the two paths on the ops port
        status, body, _ = await threads_.deferToThread(_get, f"http://{host}:{port}/ca/rsa-ca.pem")
        assert status == 200 and body.startswith(b"-----BEGIN CERTIFICATE-----")
        status, _, _ = await threads_.deferToThread(
            _get, f"http://{ops_host}:{ops_port}/ca/rsa-ca.pem")
        assert status == 404
    finally:
        await running.stop()
    # one line of certpub's own per listener, with its service and endpoint string
    listening = [(e["service"], e["endpoint"]) for e in events if e.get("log_format") == "listening"]
    assert sorted(listening) == [(s, "tcp:0:interface=127.0.0.1") for s in ("http", "ldap", "ops")]
    summary = [e for e in events if "serving listeners=" in e.get("log_format", "")]
    assert len(summary) == 1
    assert "rsa-ca(signer until" in summary[0]["cas"] and "root(no OCSP)" in summary[0]["cas"]
    assert f"ldap:{ldap_host}:{ldap_port}" in summary[0]["listeners"]
    assert summary[0]["store"] == str(config.store.path)
    assert running.access.pool is None  # stop() stopped the store threads

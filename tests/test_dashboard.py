"""The Grafana dashboard (contrib/grafana/certpub.json) queries only what /metrics exports.

A real server (the demo PKI, both listeners) answers an OCSP request and a page, then its
/metrics is parsed: every metric name in every query of the dashboard must be a sample name
it exports, and every label a query selects or groups by must be one of that metric's labels.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet import threads as threads_

from server import app
from server.config import load_config
from tests.conftest import import_demo_store

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana" / "certpub.json"
METRIC = re.compile(r"\b((?:certpub|process)_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum"), "gauge": ("",), "unknown": ("",), "info": ("_info",)}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating variable."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                out.append((inner["title"], target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        out.append((f"${var['name']}", query["query"] if isinstance(query, dict) else query))
    return out


def exported(text: str) -> dict[str, set[str]]:
    """Sample names a Prometheus scrape sees -> the label names of their samples."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def check(dashboard: dict[str, Any], names: dict[str, set[str]]) -> list[str]:
    """What in the dashboard does not match the exported names (empty: all fine)."""
    problems = []
    for where, expr in queries(dashboard):
        used = set(METRIC.findall(expr))
        if not used:
            problems.append(f"{where}: no certpub metric in {expr!r}")
        for name in sorted(used - set(names)):
            problems.append(f"{where}: {name} is not exported")
        known = set().union(*(names.get(n, set()) for n in used)) | TARGET_LABELS | {"le"}
        for metric, matchers in SELECTOR.findall(expr):
            for label in MATCHER.findall(matchers):
                if metric in names and label not in names[metric] | TARGET_LABELS:
                    problems.append(f"{where}: {metric} has no label {label}")
        for group in GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                if label not in known:
                    problems.append(f"{where}: no metric of {expr!r} has label {label}")
    return problems


def _post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(url, body, {"Content-Type": "application/ocsp-request"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()  # type: ignore[no-any-return]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()  # type: ignore[no-any-return]


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests per second", "error", "latency", "cache hit", "pre-signing",
                  "import lag", "generation", "certificates by status", "signer days left",
                  "open connections"):
        assert topic in titles, topic
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"]
               if p["type"] != "row")


def test_check_catches_unknown_metrics_and_labels() -> None:
    """The checker itself: a misspelt metric, a wrong label and a wrong grouping are found."""
    names = {"certpub_requests_total": {"protocol", "result"}}
    bad = {"panels": [{"title": "t", "targets": [
        {"expr": "rate(certpub_request_total[5m])"},
        {"expr": 'rate(certpub_requests_total{service="x"}[5m])'},
        {"expr": "sum by (ca) (rate(certpub_requests_total[5m]))"},
        {"expr": "sum by (protocol) (rate(certpub_requests_total{instance=~\"$i\"}[5m]))"},
    ]}]}
    assert check(bad, names) == [
        "t: certpub_request_total is not exported",
        "t: certpub_requests_total has no label service",
        "t: no metric of 'sum by (ca) (rate(certpub_requests_total[5m]))' has label ca",
    ]


@pytest_twisted.ensureDeferred
async def test_every_dashboard_query_uses_exported_metrics(demo_pki: Any, demo_now: datetime,
                                                           tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    store = import_demo_store(demo_pki, tmp_path / "store.sqlite3", demo_now)
    config = load_config(demo_pki.config_path)
    config = dataclasses.replace(
        config,
        store=dataclasses.replace(config.store, path=store),
        ldap=dataclasses.replace(config.ldap, listen=("tcp:0:interface=127.0.0.1",)),
        http=dataclasses.replace(config.http, listen=("tcp:0:interface=127.0.0.1",)),
        ops=dataclasses.replace(config.ops, listen=("tcp:0:interface=127.0.0.1",)),
    )
    running = await app.start(config, reactor, lambda: datetime.now(UTC))
    try:
        host, port = running.address("http")
        good = next(c for c in demo_pki.certs if c.state == "good" and c.ca == "rsa-ca")
        cert = x509.load_pem_x509_certificate(good.path.read_bytes())
        issuer = x509.load_pem_x509_certificate(demo_pki.cas["rsa-ca"].cert_path.read_bytes())
        der = (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
               .public_bytes(serialization.Encoding.DER))
        for _ in range(2):  # a miss, then a hit
            answer = await threads_.deferToThread(_post, f"http://{host}:{port}/ocsp", der)
            assert ocsp.load_der_ocsp_response(answer).certificate_status \
                == ocsp.OCSPCertStatus.GOOD
        await threads_.deferToThread(_get, f"http://{host}:{port}/ca/rsa-ca.pem")
        ops_host, ops_port = running.address("ops")
        text = (await threads_.deferToThread(_get, f"http://{ops_host}:{ops_port}/metrics")
                ).decode()
    finally:
        await running.stop()
    names = exported(text)
    assert "certpub_requests_total" in names and "certpub_request_seconds_bucket" in names
    assert check(json.loads(DASHBOARD.read_text()), names) == []

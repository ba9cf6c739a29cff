"""``certpub demo``: commands that paste, a walk-through true on every run, busy ports first."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from server.demo.run import busy_ports, check_ports, commands, prepare, run_demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_of(m: dict[str, Any], which: str) -> str:
    from server.config import load_config
    from store import open_store

    config = load_config(Path(m["config"]))
    store = open_store(config.store.location, create=False)
    try:
        ca = store.ca_by_name(m[which]["ca"])
        assert ca is not None
        cert = store.cert(ca.id, m[which]["serial"])
        assert cert is not None
        return str(cert.status.value)
    finally:
        store.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("demo") / "certpub-demo"
    return folder, prepare(folder, free_port(), free_port(), fresh=False)


def test_printed_status_command_works_when_pasted(demo: tuple[Path, dict[str, Any]]) -> None:
    """The printed `certpub status` line runs in a shell whose PATH has no venv."""
    folder, m = demo
    text = commands(m, *m["ports"])
    lines = text.splitlines()
    line = lines[lines.index("# the store: certificates per CA and status, CRLs, last import") + 1]
    assert " status --config " in line and not line.startswith("certpub ")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    r = subprocess.run(line, shell=True, cwd="/", env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "generation" in r.stdout and "rsa-ca" in r.stdout
    assert shlex.split(line)[0].endswith("/certpub")


def test_rerun_resets_the_walk_through(demo: tuple[Path, dict[str, Any]]) -> None:
    """After the walk-through's newer CRL was imported (and a file left in the spool), a
    second run without --fresh starts again from the first CRLs: "# good" is true again."""
    from server.config import load_config
    from importer.run import import_paths

    folder, m = demo
    assert status_of(m, "crl2") == "good"
    config = load_config(Path(m["config"]))
    import_paths(config, [Path(m["crl2"]["crl"])], now=lambda: datetime.now(UTC), progress=None)
    assert status_of(m, "crl2") == "revoked"
    pending = Path(m["spool"]) / "crl-2.pem"
    pending.write_bytes(Path(m["crl2"]["crl"]).read_bytes())
    (Path(m["spool"]) / "done").mkdir(exist_ok=True)
    again = prepare(folder, *m["ports"], fresh=False)
    assert again == m
    assert status_of(m, "crl2") == "good"
    assert status_of(m, "revoked") == "revoked"
    assert list(Path(m["spool"]).iterdir()) == []


def test_busy_port_is_reported_before_anything_is_built(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        http = free_port()
        assert busy_ports({"--ldap-port": busy, "--http-port": http}) == {
            "--ldap-port": "Address already in use"}
        folder = tmp_path / "certpub-demo"
        with pytest.raises(SystemExit) as info:
            run_demo(folder, ldap_port=busy, http_port=http, serve=True, fresh=False)
        message = str(info.value)
        assert message.startswith(f"certpub: port {busy} (LDAP) on 127.0.0.1: Address already")
        assert "try again with --ldap-port " in message and "--http-port" not in message
        assert not folder.exists()  # no PKI was built first
        (folder).mkdir()
        (folder / "demo.json").write_text("{}")  # an existing demo needs --fresh for new ports
        with pytest.raises(SystemExit, match="try again with --fresh --ldap-port "):
            check_ports(folder, busy, http)


@pytest.mark.realclient
@pytest_twisted.ensureDeferred
async def test_printed_certificate_url_commands_work(demo: tuple[Path, dict[str, Any]]) -> None:
    """The walk-through's `curl` on URLs read from a certificate (CDP, freshest CRL,
    caIssuers) and `ldapsearch` on its ldap:// distribution point, pasted into a shell while
    the demo's configuration is served on its ports."""
    from twisted.internet import reactor, threads

    from server.config import load_config
    from server.feed import ChangeFeed
    from server.http.site import make_http_factory
    from server.ldap.server import make_ldap_factory
    from store import open_store
    from tests.conftest import require_tool

    for tool in ("curl", "ldapsearch", "openssl"):
        require_tool(tool)
    _, m = demo
    ldap_port, http_port = m["ports"]
    config = load_config(Path(m["config"]))
    store = open_store(config.store.location, create=False)
    feed = ChangeFeed(store)
    feed.prime()
    now = lambda: datetime.now(UTC)  # noqa: E731
    http = reactor.listenTCP(http_port, make_http_factory(config, store, feed, now, reactor),  # type: ignore[attr-defined]
                             interface="127.0.0.1")
    ldap = reactor.listenTCP(ldap_port, make_ldap_factory(config.ldap, store, feed, None, now),  # type: ignore[attr-defined]
                             interface="127.0.0.1")
    try:
        text = commands(m, ldap_port, http_port)
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if "two CRL partitions" in line)
        block = lines[start + 1:lines.index("", start)]
        script = "set -e\n" + "\n".join(block) + "\n"
        r = await threads.deferToThread(subprocess.run, ["sh", "-c", script],
                                        capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (script, r.stdout, r.stderr)
        out = r.stdout
        assert f"http://127.0.0.1:{http_port}/repository/ec-ca/part" in out
        assert "Issuing Distribution Point" in out and "CRL Number" in out
        assert "Delta CRL Indicator" in out
        assert "subject=C = MO" in out and "Demo EC Issuing CA" in out
        assert "certificateRevocationList;binary:: " in out
    finally:
        await http.stopListening()
        await ldap.stopListening()
        store.close()

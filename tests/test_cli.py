"""The command line: every subcommand has --help; errors are one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["serve", "importd", "import", "status", "migrate", "copy-store", "check-config", "demo"]


def certpub(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = certpub(command, "--help")
    assert result.returncode == 0
    assert "usage: certpub " + command in result.stdout


def test_no_command_prints_usage() -> None:
    result = certpub()
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("command", ["serve", "importd", "import", "status", "check-config",
                                     "migrate", "copy-store --from x"])
def test_missing_config_is_one_line(command: str, tmp_path: Path) -> None:
    result = certpub(*command.split(), "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 78
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot read configuration" in result.stderr and "none.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_key_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[store]\npath = "x"\nbogus = 1\n')
    result = certpub("check-config", "--config", str(conf))
    assert result.returncode == 78
    assert "store.bogus: unknown key" in result.stderr


def test_manual_migration_then_import_and_status(store_location: str, tmp_path: Path) -> None:
    """[store] migrate = "manual": nothing opens an old schema until `certpub migrate` ran."""
    from tests.importer.test_importer_helpers import MiniPki, pem, write

    pki = MiniPki(tmp_path / "pki", store=store_location)
    conf = pki.config().source
    assert conf is not None
    conf.write_text(conf.read_text().replace("[store]\n", '[store]\nmigrate = "manual"\n', 1))
    write(tmp_path / "in" / "c.pem", pem(pki.cert("ca-a", 0x42)))
    refused = certpub("import", str(tmp_path / "in"), "--config", str(conf))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "schema version 0" in refused.stderr and "run `certpub migrate`" in refused.stderr
    first = certpub("migrate", "--config", str(conf))
    assert first.returncode == 0 and "schema version 0 -> 4" in first.stdout, first.stderr
    again = certpub("migrate", "--config", str(conf))
    assert again.returncode == 0 and "schema version 4, nothing to do" in again.stdout
    done = certpub("import", str(tmp_path / "in"), "--config", str(conf))
    assert done.returncode == 0, done.stderr
    status = certpub("status", "--config", str(conf))
    assert status.returncode == 0, status.stderr
    assert "generation 2" in status.stdout
    assert [line.split()[:2] for line in status.stdout.splitlines() if line.startswith("ca-a")] \
        == [["ca-a", "1"]]


def test_status_columns_partition_the_certificates(demo_pki, demo_now, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """good + revoked + on hold + expired = total = the CA's certificates: a certificate on
    hold is counted once (under "on hold"), an expired revoked one once (under "revoked")."""
    from tests.conftest import import_demo_store

    store = import_demo_store(demo_pki, tmp_path / "store.sqlite3", demo_now)
    text = demo_pki.config_path.read_text()
    old = str(demo_pki.root / "store" / "store.sqlite3")
    assert old in text
    conf = tmp_path / "certpub.toml"
    conf.write_text(text.replace(old, str(store)))
    result = certpub("status", "--config", str(conf))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:7] == ["CA", "good", "revoked", "on", "hold", "expired", "total"]
    kind = {"good": 0, "revoked": 1, "revoked-expired": 1, "hold": 2, "expired": 3}
    seen = set()
    end = lines.index("") if "" in lines else len(lines)  # then the CRL scopes, per CA
    assert lines[end + 1].split()[:3] == ["CA", "CRL", "scope"]
    assert any(line.split()[:2] == ["rsa-ca", "full"] for line in lines[end + 2:])
    for line in lines[2:end]:
        ca, *counts = line.split()[:6]
        good, revoked, hold, expired, total = map(int, counts)
        expected = [0, 0, 0, 0]
        for c in demo_pki.certs:
            if c.ca == ca:
                expected[kind[c.state]] += 1
        assert good + revoked + hold + expired == total, line
        if ca == "root":  # it issued the two issuing CAs, not subscribers
            continue
        assert [good, revoked, hold, expired] == expected, line
        assert total == sum(expected) and hold >= 1  # hold: the case once counted twice
        seen.add(ca)
    assert seen == {c.ca for c in demo_pki.certs}


def test_status_into_a_closed_pipe_is_not_an_error(demo_pki, demo_now, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`certpub status | head -1`: the reader leaving is reported as a shell reports SIGPIPE
    (141), with nothing on stderr (it said "internal error: BrokenPipeError")."""
    from tests.conftest import import_demo_store

    store = import_demo_store(demo_pki, tmp_path / "store.sqlite3", demo_now)
    conf = tmp_path / "certpub.toml"
    conf.write_text(demo_pki.config_path.read_text().replace(
        str(demo_pki.root / "store" / "store.sqlite3"), str(store)))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        result = subprocess.run([sys.executable, "-m", "server.cli", "status", "--config",
                                 str(conf)], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""

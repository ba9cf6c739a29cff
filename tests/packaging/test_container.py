"""The container image (Containerfile) built with podman on a local debootstrap base: it runs
as the certpub user, reads /etc/certpub, keeps the store on a volume, answers openssl ocsp and
ldapsearch on published 127.0.0.1 ports, passes its HEALTHCHECK (the ops listener), reloads on SIGHUP and stops
cleanly on SIGTERM as certpub serve is PID 1."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.packaging.debroot import ROOT, free_port, require_root_tools, run
from tests.packaging.test_deb import check_answers

pytestmark = [pytest.mark.realclient, pytest.mark.packaging]
CONF = {"CONTAINERS_CONF": str(ROOT / ".ci" / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], check=check, timeout=timeout, env={**os.environ, **CONF})


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def image(deb: Path) -> Iterator[str]:
    require_root_tools("podman", "runc")
    require_tool("openssl")
    require_tool("ldapsearch")
    result = run([ROOT / "scripts" / "build-image", "--deb", deb, "--tag", "certpub-test"],
                 env={**os.environ, **CONF})
    name = result.stdout.strip().splitlines()[-1]
    yield name
    # Each commit's image is new: CI's disk keeps only the cached base between runs.
    podman("rmi", "-f", name, "localhost/certpub-test:latest", check=False)


@pytest.fixture
def etc(image: str, deb_pki, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """/etc/certpub for the container: the demo CA's files and a configuration for them,
    owned by the image's certpub user."""
    folder = tmp_path / "etc"
    shutil.copytree(deb_pki.root, folder, ignore=shutil.ignore_patterns("store", "spool", "*.toml"))
    text = deb_pki.config_path.read_text().replace(str(deb_pki.root), "/etc/certpub")
    lines = []
    for line in text.splitlines():
        if line.startswith("path = "):
            line = 'path = "/var/lib/certpub/store.sqlite3"'
        elif line.startswith("spool = "):
            line = 'spool = ["/var/spool/certpub"]'
        elif line.startswith('listen = ["tcp:1389'):
            line = 'listen = ["tcp:1389"]'
        elif line.startswith('listen = ["tcp:8080'):
            line = 'listen = ["tcp:8080"]'
        lines.append(line)
    lines += ["[ops]", 'listen = ["tcp:9100"]']
    (folder / "certpub.toml").write_text("\n".join(lines) + "\n")
    ids = podman("run", "--rm", "--entrypoint", "/usr/bin/id", image, "-u").stdout.strip()
    gid = podman("run", "--rm", "--entrypoint", "/usr/bin/id", image, "-g").stdout.strip()
    run(["chown", "-R", f"{ids}:{gid}", folder])
    return folder


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"certpub-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


def test_container_serves_reloads_and_stops(image: str, etc: Path, volume: str, deb_pki) -> None:  # type: ignore[no-untyped-def]
    mounts = ["-v", f"{etc}:/etc/certpub:ro", "-v", f"{volume}:/var/lib/certpub"]
    crls = [str(ca.crl_path).replace(str(deb_pki.root), "/etc/certpub")
            for ca in deb_pki.cas.values() if ca.crl_path is not None]
    podman("run", "--rm", *mounts, image, "import", "--openssl", *crls)

    ldap_port, http_port, ops_port = free_port(), free_port(), free_port()
    name = f"certpub-test-{uuid.uuid4().hex[:8]}"
    # --health-interval=disable: no systemd timer here; `podman healthcheck run` checks once.
    podman("run", "-d", "--name", name, "--health-interval=disable", *mounts,
           "-p", f"127.0.0.1:{ldap_port}:1389", "-p", f"127.0.0.1:{http_port}:8080",
           "-p", f"127.0.0.1:{ops_port}:9100", image)
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if get(ops_port, "/healthz") == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > end:
                raise AssertionError(f"container {state}:\n" + podman("logs", name).stderr
                                     + podman("logs", name).stdout)
            time.sleep(0.5)
        assert podman("exec", name, "id", "-un").stdout.strip() == "certpub"
        assert podman("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")[1:3] == \
            ["/usr/bin/certpub", "serve"]
        check_answers(deb_pki, ldap_port, http_port)
        # /metrics and /healthz are the ops listener's, not the public port's.
        assert get(ops_port, "/metrics") == 200
        assert get(http_port, "/metrics") == get(http_port, "/healthz") == 404
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        podman("kill", "--signal", "HUP", name)
        end = time.monotonic() + 30
        while "configuration reloaded" not in (logs := podman("logs", name).stdout):
            assert time.monotonic() < end, logs
            time.sleep(0.3)
        check_answers(deb_pki, ldap_port, http_port)

        podman("stop", "--time", "30", name, timeout=60)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        assert "stopping" in podman("logs", name).stdout
    finally:
        podman("rm", "-f", name, check=False)

"""A clean Debian root to install the package into: extracted from scripts/debian-root's cached
tarball, with /proc, /dev and the apt download cache mounted while it is in use, and always
unmounted and removed after, even when a test fails."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CERTPUB_CI_CACHE", "/var/cache/certpub-ci"))
# Keep the build's output and the chroot out of the checkout and out of /tmp's tmpfs (if any).
WORK = CACHE / "work"


def require_root_tools(*tools: str) -> None:
    """Skip (fail under CERTPUB_REQUIRE_CLIENTS=1) without root or without a tool."""
    if os.geteuid() != 0:
        skip_or_fail("the packaging tests need root (debootstrap, chroot, mount)")
    for tool in tools:
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed")


def run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 900,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, its output captured; on failure the error shows that output."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result  # type: ignore[no-any-return]


def build_deb(out: Path, *args: str) -> Path:
    """scripts/build-deb into out; the .deb's path."""
    result = run([ROOT / "scripts" / "build-deb", "--out", out, *args])
    return Path(result.stdout.strip().splitlines()[-1])


def debian_root_tarball() -> Path:
    return Path(run([ROOT / "scripts" / "debian-root"]).stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


class Chroot:
    """A Debian root at ``path``; commands run inside with ``chroot``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __truediv__(self, inner: str) -> Path:
        return self.path / inner.lstrip("/")

    def run(self, *argv: str, user: str | None = None, check: bool = True,
            env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run(self.command(*argv, user=user), check=check, env=self.env(env), timeout=timeout)

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        spec = []
        if user is not None:
            uid, gid = self.ids(user)
            spec = [f"--userspec={uid}:{gid}", f"--groups={gid}"]
        return ["chroot", *spec, str(self.path), *argv]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k.startswith("CERTPUB_TEST")}
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive",
                **keep, **(extra or {})}

    def ids(self, user: str) -> tuple[int, int]:
        for line in (self / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise AssertionError(f"no user {user} in the chroot")

    def apt_install(self, *what: str) -> subprocess.CompletedProcess[str]:
        return self.run("apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "-o", "Dpkg::Options::=--force-confdef",
                        "-o", "Dpkg::Options::=--force-confold", *what)


@contextmanager
def debian_chroot(name: str) -> Iterator[Chroot]:
    """A fresh root from the cached tarball, mounted for apt and Python, removed after."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / name
    _remove(path)
    path.mkdir()
    try:
        run(["tar", "-C", path, "--numeric-owner", "-xf", debian_root_tarball()])
        archives = CACHE / "apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "proc", "proc", path / "proc"])
        run(["mount", "--bind", "/dev", path / "dev"])
        # Private, so what is mounted under it (dev/shm) never reaches the host's /dev.
        run(["mount", "--make-private", path / "dev"])
        run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", path / "dev/shm"])
        run(["mount", "--bind", archives, path / "var/cache/apt/archives"])
        run(["mount", "--make-private", path / "var/cache/apt/archives"])
        shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")
        root = Chroot(path)
        root.run("apt-get", "update", "-q")
        yield root
    finally:
        _remove(path)


def _remove(path: Path) -> None:
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], check=False)
    if _mounts_under(path):
        raise AssertionError(f"still mounted under {path}: {_mounts_under(path)}; not removed")
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)

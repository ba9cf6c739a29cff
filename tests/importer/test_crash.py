"""kill -9 at random moments, then restart: the store ends as after one uninterrupted import."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from cryptography import x509

from importer.run import import_paths
from tests.importer.test_importer_helpers import MiniPki, clock, der, dump, pem, write

REPO = Path(__file__).resolve().parents[2]
R = x509.ReasonFlags
CERTS = 4400


def make_inputs(pki: MiniPki, src: Path) -> set[str]:
    """Certificates (single, bundled, DER), cumulative CRLs with holds, junk; returns junk names."""
    serials = list(range(0x1000, 0x1000 + CERTS))
    certs = {s: pki.cert("ca-a" if s % 3 else "ca-b", s) for s in serials}
    for s in serials[:4000]:
        write(src / f"c{s:05x}.pem", pem(certs[s]))
    for i in range(0, 300, 20):  # bundles of 20
        write(src / f"b{i:04}.pem", b"".join(pem(certs[s]) for s in serials[4000 + i:4020 + i]))
    for s in serials[4300:]:
        write(src / f"d{s:05x}.der", der(certs[s]))
    # Cumulative CRLs of ca-a interleaved with the certificates (by name): holds come and go.
    revoked: list[tuple[int, x509.ReasonFlags | None]] = []
    for n in range(1, 7):
        revoked += [(s, R.key_compromise if s % 2 else None) for s in serials[n * 40:n * 40 + 5]
                    if s % 3]
        held = [(s, R.certificate_hold) for s in serials[n * 50 + 1:n * 50 + 4] if s % 3]
        write(src / f"c{serials[n * 600]:05x}-crl{n}.pem", pem(pki.crl("ca-a", n, revoked + held)))
    write(src / "zz-crl-b.pem", pem(pki.crl("ca-b", 1, [(serials[2], R.superseded)])))
    write(src / "c01000-copy.pem", pem(certs[serials[0]]))  # same content as another file
    write(src / "ca-a-reissued.pem", pem(pki.reissue("ca-a", 10)))
    junk = {"j1.pem": b"junk", "j2.pem": pem(pki.cert(pki.foreign, 0x77))}
    for name, data in junk.items():
        write(src / name, data)
    return set(junk)


def workers_alive(marker: str) -> list[int]:
    """Processes (importer or its workers) started by this test that still run."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                alive.append(int(entry.name))
        except OSError:
            continue
    return alive


def test_kill_9_and_restart_end_like_a_clean_import(tmp_path: Path, store_location: str) -> None:
    # The clean import goes to SQLite; the killed one to each engine in turn (store_location),
    # so on PostgreSQL this also checks that both engines end with the same content.
    pki = MiniPki(tmp_path / "pki")
    src = tmp_path / "src"
    junk = make_inputs(pki, src)
    names = sorted(p.name for p in src.iterdir())

    clean = pki.config(store=tmp_path / "clean" / "store.sqlite3", batch_size=300,
                       spool=[tmp_path / "unused"])
    summary = import_paths(clean, [src], now=clock(), progress=None)
    assert {Path(n).name for n, _ in summary.rejected} == junk
    expected = dump(clean.store.location)

    spool = tmp_path / "spool"
    spool.mkdir()
    for name in names:
        os.link(src / name, spool / name)  # the spool gets its own names for the same files
    config = pki.config(store=store_location, batch_size=300,
                        spool=[spool], poll_interval=0.05)
    assert config.source is not None
    marker = f"CERTPUB_CRASH_TEST={uuid.uuid4()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    cmd = [sys.executable, "-m", "server.cli", "importd", "--config", str(config.source), "--once"]
    rng = random.Random()
    kills, left = 0, [len(names)]
    for _ in range(4):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wait until this run has visibly started moving files (start-up time depends on how
        # busy the machine is), then kill somewhere in the rest of the import.
        started = time.monotonic()
        while (proc.poll() is None and time.monotonic() - started < 60
               and sum(1 for p in spool.iterdir() if p.is_file()) >= left[-1]):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5 * summary.elapsed * left[-1] / len(names)))
        if proc.poll() is not None:
            break  # finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        left.append(sum(1 for p in spool.iterdir() if p.is_file()))
    print(f"{kills} kills; files left in the spool after each: {left[1:]}")
    assert kills >= 2, "the import finished before it could be killed often enough"
    assert any(0 < n < len(names) for n in left[1:]), left  # some kills hit a running import
    deadline = time.monotonic() + 2
    while workers_alive(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers_alive(marker) == []  # worker processes die with the importer

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert dump(config.store.location) == expected
    assert sorted(p.name for p in spool.iterdir()) == ["done", "rejected"]
    moved = [p.name for p in (spool / "done").iterdir()]
    rejected = [p.name for p in (spool / "rejected").iterdir() if not p.name.endswith(".reason")]
    assert len(moved) + len(rejected) >= len(names)  # nothing lost (a retried move may copy)
    assert {n.split(".")[0] for n in rejected} == {n.split(".")[0] for n in junk}

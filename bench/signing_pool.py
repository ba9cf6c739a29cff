"""Threads or processes for signing (issue 18): does signing release the GIL, and what does a
signing process cost the server in IPC?

Usage: python bench/signing_pool.py DATA [--seconds 2]

DATA as for bench/ocsp_bench.py (its certpub.toml, store and signer are used). Printed:
1. the CPU cost of one miss in the server process (``OcspService.compute``: parse, store
   read, encode, sign) for a nonce request of an issued certificate and for a never-issued
   serial, and of the signature alone (the CA's P-256 key; an RSA-2048 key for comparison);
2. the GIL: calls per second of one and of two threads signing (or computing misses) in a
   loop, and the CPU the process used: a call that releases the GIL scales to ~2x on two
   cores, one that holds it stays at ~1x and one core;
3. a signing process (``server.ocsp.signworker``) driven the way ``ProcessSigners`` drives it:
   jobs/s with 1 and 2 outstanding, and the parent's CPU per job (pickling, pipe writes and
   reads, unpickling) — what the reactor pays instead of the miss itself.
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402

from ocsp_flood import requests_for, SERIAL_OCTETS  # noqa: E402

FRAME = struct.Struct(">I")


def threaded(work: Any, threads: int, seconds: float) -> tuple[float, float]:
    """(calls/s of ``threads`` threads calling work in a loop, the process's CPU in cores)."""
    stop = threading.Event()
    counts = [0] * threads

    def loop(i: int) -> None:
        while not stop.is_set():
            work()
            counts[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    c0 = time.process_time()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / seconds, (time.process_time() - c0) / seconds


def per_call(fn: Any, seconds: float) -> float:
    n = 0
    c0 = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        n += 1
    return 1e6 * (time.process_time() - c0) / n


def send(proc: subprocess.Popen[bytes], message: Any) -> None:
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    assert proc.stdin is not None
    proc.stdin.write(FRAME.pack(len(data)) + data)
    proc.stdin.flush()


def receive(proc: subprocess.Popen[bytes]) -> Any:
    assert proc.stdout is not None
    (n,) = FRAME.unpack(proc.stdout.read(4))
    return pickle.loads(proc.stdout.read(n))  # noqa: S301 - our own child


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    from server.config import load_config
    from server.ocsp.service import OcspService
    from store import open_store

    config = load_config(args.data / "certpub.toml")
    store = open_store(config.store.location, create=False, migrate=False)
    now = datetime.now(UTC)
    service = OcspService(config, store, lambda: now)
    reqs = requests_for(args.data, 0x1000)
    rnd = iter(range(1 << 60))

    def nonce_miss() -> Any:
        return service.compute(reqs["nonce_prefix"] + os.urandom(32), now)

    def unknown_miss() -> Any:
        serial = (0x10 << (8 * (SERIAL_OCTETS - 1))) + next(rnd)
        der = reqs["unknown_prefix"] + serial.to_bytes(SERIAL_OCTETS, "big")
        return service.compute(der, now)

    assert nonce_miss().outcome.status == "successful"
    assert unknown_miss().unknown
    ek = ec.generate_private_key(ec.SECP256R1())
    rk = rsa.generate_private_key(65537, 2048)
    tbs = os.urandom(300)

    def sign_ec() -> Any:
        return ek.sign(tbs, ec.ECDSA(hashes.SHA256()))

    def sign_rsa() -> Any:
        return rk.sign(tbs, padding.PKCS1v15(), hashes.SHA256())

    s = args.seconds
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print("1. CPU per call, one thread (µs)")
    for name, fn in (("miss: nonce, issued certificate", nonce_miss),
                     ("miss: never-issued serial", unknown_miss),
                     ("sign only: ECDSA P-256", sign_ec), ("sign only: RSA-2048", sign_rsa)):
        print(f"   {name:<36} {per_call(fn, s):8.1f}")
    print("2. the GIL: one thread vs two threads calling it in a loop (two cores). Released:")
    print("   ~2x the calls at ~2 cores; held: ~1x at ~1 core")
    for name, fn in (("sign only: ECDSA P-256", sign_ec), ("sign only: RSA-2048", sign_rsa),
                     ("miss: nonce (OcspService.compute)", nonce_miss)):
        one, _ = threaded(fn, 1, s)
        two, cores = threaded(fn, 2, s)
        print(f"   {name:<36} 1 thread {one:7.0f}/s   2 threads {two:7.0f}/s"
              f" ({two / one:4.2f}x) using {cores:4.2f} cores")
    print("3. a signing process (server.ocsp.signworker), as ProcessSigners drives it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", "server.ocsp.signworker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        send(proc, ("init", config, config.store.location, now))
        assert receive(proc)[0] == "ready"
        for depth in (1, 2):
            jobs = 0
            c0, t0 = time.process_time(), time.perf_counter()
            outstanding = 0
            while time.perf_counter() - t0 < s:
                while outstanding < depth:
                    send(proc, ("job", jobs, reqs["nonce_prefix"] + os.urandom(32), now, True))
                    outstanding += 1
                    jobs += 1
                message = receive(proc)
                assert message[0] == "done"
                outstanding -= 1
            while outstanding:
                receive(proc)
                outstanding -= 1
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            print(f"   depth {depth}: {jobs / wall:8.0f} nonce answers/s;"
                  f" parent CPU {1e6 * cpu / jobs:6.1f} µs per job")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


if __name__ == "__main__":
    main()

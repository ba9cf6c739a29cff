"""Import speed: certpub import against slapadd of the same certificates, in one run.

Usage: python bench/import_bench.py DATA [--runs slapadd,index,files,postgres] [--out DIR]
                                         [--ldif FILE] [--batch-size N] [--keep]

DATA is a ``bench/gen_certs.py`` directory (one file per certificate: certs/<SERIAL>.pem,
index.txt, ca.pem); it is only read. Each run starts from an empty store in DIR (default a
temporary folder, removed at the end):

- ``index``: ``certpub import --openssl`` — the OpenSSL database (index.txt + the certificate
  files it names), SQLite store;
- ``files``: ``certpub import DATA/certs`` — a spool-like folder of PEM files through the same
  batch pipeline as the import daemon (files are read in place, not moved), SQLite store;
- ``postgres``: the ``index`` run into a throwaway PostgreSQL cluster (``tests/pg.py``:
  initdb in /tmp, fsync off — a benchmark store, not a durable one);
- ``slapadd``: ``slapadd -q`` of the same certificates as LDIF (``bench/gen_ldif.py``, written
  once to --ldif or into DIR, not timed), mdb backend, the indexes of
  ``bench/slapd_env.py``.

For each run: certificates (entries for slapadd), wall seconds, certificates per second, CPU
seconds (user + system of the process and its workers), peak RSS of the process tree (sampled
every 0.1 s, MiB) and the rate as a fraction of slapadd's. Run it under the exclusive CPU lock
(``flock -x /tmp/certpub-cpu.lock``); the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.pg_env import certpub_cmd
from bench.slapd_env import CONF, MODULES, SCHEMA, SLAPADD


def _tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], *, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run cmd; wall seconds, CPU seconds of it and its children, peak RSS of its tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], sum(_rss_kib(p) for p in _tree(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        done.set()
        sampler.join()
    took = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 3):
        sys.stderr.write(err.decode(errors="replace")[-2000:])
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return {"seconds": took,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            # ru_maxrss of children is the largest child ever (an earlier run's too): only a
            # fallback for a run too short to be sampled, and only when it grew in this run
            "peak_rss_mib": (peak[0] or (after.ru_maxrss if after.ru_maxrss > before.ru_maxrss
                                         else 0)) / 1024,
            "output": (out + err).decode(errors="replace")}  # type: ignore[dict-item]


def write_config(data: Path, folder: Path, store: str, batch_size: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    store_line = f'url = "{store}"' if store.startswith("postgresql://") else f'path = "{store}"'
    text = f"""[store]
{store_line}

[import]
spool = ["{folder}/spool"]
{f"batch_size = {batch_size}" if batch_size else ""}

[[import.openssl]]
ca = "bench"
index = "{data}/index.txt"
certs_dir = "{data}/certs"

[[ca]]
name = "bench"
certificate = "{data}/ca.pem"
"""
    path = folder / "certpub.toml"
    path.write_text(text)
    return path


def certs_imported(output: str) -> int:
    """The new certificates of certpub's summary line."""
    for line in output.splitlines():
        if line.startswith("import:") and "certificates " in line:
            return int(line.split("certificates ", 1)[1].split(" new", 1)[0])
    raise SystemExit(f"no summary line in certpub's output:\n{output[-2000:]}")


def run_certpub(data: Path, folder: Path, store: str, batch_size: int | None,
                what: str) -> dict[str, float]:
    config = write_config(data, folder, store, batch_size)
    args = ["--openssl"] if what == "index" else [str(data / "certs")]
    r = measure([*certpub_cmd(), "import", "--config", str(config), *args])
    r["count"] = certs_imported(str(r["output"]))
    return r


def run_slapadd(data: Path, work: Path, ldif: Path | None) -> dict[str, float]:
    ldif = ldif or work / "bench.ldif"
    if not ldif.exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "bench" / "gen_ldif.py"), str(data), str(ldif)],
                       check=True)
        print(f"(LDIF written in {time.perf_counter() - t0:.0f} s, not timed)", file=sys.stderr)
    folder = work / "slapd"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "db").mkdir(parents=True)
    conf = folder / "slapd.conf"
    conf.write_text(CONF.format(schema=SCHEMA, dir=folder, modules=MODULES))
    r = measure([SLAPADD, "-q", "-f", str(conf), "-l", str(ldif)])
    r["count"] = sum(1 for line in ldif.open("rb") if line.startswith(b"dn:"))
    shutil.rmtree(folder, ignore_errors=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", default="slapadd,index,files,postgres",
                    help="comma-separated: slapadd, index, files, postgres")
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--batch-size", type=int, help="[import] batch_size (default: certpub's)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--ldif", type=Path,
                    help="the LDIF of DATA (written there by bench/gen_ldif.py when missing)")
    args = ap.parse_args()
    data = args.data.resolve()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-import-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, dict[str, float]]] = []
    try:
        for run in runs:
            if run == "slapadd":
                results.append(("slapadd -q (mdb)", run_slapadd(data, work, args.ldif)))
            elif run in ("index", "files"):
                store = work / f"{run}.sqlite3"
                for p in work.glob(f"{run}.sqlite3*"):
                    p.unlink()
                label = "index.txt + certs" if run == "index" else "folder of PEM files"
                results.append((f"certpub {label}, SQLite",
                                run_certpub(data, work / run, str(store), args.batch_size, run)))
            elif run == "postgres":
                from tests.pg import PgCluster, find_bindir

                bindir = find_bindir()
                if bindir is None:
                    print("postgres: no PostgreSQL binaries, skipped", file=sys.stderr)
                    continue
                cluster = PgCluster.start(bindir)
                try:
                    url = cluster.create_database()
                    results.append(("certpub index.txt + certs, PostgreSQL",
                                    run_certpub(data, work / "pg", url, args.batch_size, "index")))
                finally:
                    cluster.stop()
            else:
                raise SystemExit(f"unknown run {run!r}")
            name, r = results[-1]
            print(f"  {name}: {r['count']:.0f} in {r['seconds']:.1f} s", file=sys.stderr)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    base = next((r["count"] / r["seconds"] for n, r in results if n.startswith("slapadd")), None)
    print(f"import of {data.name} ({os.cpu_count()} CPUs, load average"
          f" {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(f"| {'run':<40} | {'objects':>9} | {'wall s':>7} | {'per s':>8} | {'CPU s':>7} |"
          f" {'peak RSS MiB':>12} | {'vs slapadd':>10} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 14}|{'-' * 12}|")
    for name, r in results:
        rate = r["count"] / r["seconds"]
        ratio = f"{rate / base:.3f}x" if base else "-"
        print(f"| {name:<40} | {r['count']:>9.0f} | {r['seconds']:>7.1f} | {rate:>8.0f} |"
              f" {r['cpu_s']:>7.1f} | {r['peak_rss_mib']:>12.0f} | {ratio:>10} |")


if __name__ == "__main__":
    main()

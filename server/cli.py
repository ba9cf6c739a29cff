"""The ``certpub`` command: serve, importd, import, status, migrate, copy-store, check-config, demo.

Strategy: each subcommand is a function taking parsed arguments and returning an exit code;
every error a user can cause (configuration, files, store) is caught at this one place and
printed as a single line naming what was wrong, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from server.config import DEFAULT_CONFIG_PATH, Config, load_config
from server.configtools import ConfigError
from store.errors import StoreError

EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG, as systemd and sysexits know it
EXIT_FAILURE = 1


class CliError(Exception):
    """An error the user can fix; printed as one line."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def now() -> datetime:
    return datetime.now(UTC)


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    from server.ocsp.signer import check_signers

    for line in check_signers(config, now()):
        print(line)
    print(f"{args.config}: OK ({len(config.cas)} CAs, store {config.store.shown})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    config = _config(args)
    from importer.run import import_openssl, import_paths
    from importer.settings import ImportSettings, SetupError

    paths = [Path(p) for p in args.paths]
    for p in paths:
        if not p.exists():
            raise CliError(f"{p}: no such file or folder")
    summary = None
    if not config.import_.openssl and not paths:
        raise CliError("nothing to import: give files or folders, or configure [[import.openssl]]",
                       EXIT_USAGE)
    settings = ImportSettings.of(config)
    try:
        if args.openssl or not paths:
            summary = import_openssl(settings, now=now, progress=sys.stderr)
            print(summary.line())
        if paths:
            summary = import_paths(settings, paths, now=now, progress=sys.stderr)
            print(summary.line())
    except SetupError as exc:
        raise ConfigError(exc.key, exc.message) from None
    return 0 if summary is None or not summary.rejected else 3


def cmd_importd(args: argparse.Namespace) -> int:
    config = _config(args)
    from importer.settings import ImportSettings
    from importer.spool import run_daemon
    from server.logs import start_logging

    start_logging(config.log.format, config.log.level, config.log.file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_daemon(ImportSettings.of(config), now=now, stop=stop, once=args.once)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.workers import SupervisorError, resolve_workers, supervise

    config = _config(args)
    workers = resolve_workers(config.server.workers if args.workers is None else args.workers)
    if workers == 1:
        from server.serve import serve

        return serve(config, Path(args.config))
    try:
        return supervise(config, Path(args.config), workers)
    except SupervisorError as exc:
        raise CliError(str(exc), exc.code) from None


def _workers_arg(text: str) -> int:
    from server.config import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes; got {text!r}") from None
    if not 0 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_WORKERS}; got {value}")
    return value


def cmd_status(args: argparse.Namespace) -> int:
    from server.status import print_status
    from store import is_postgres_url

    config = _config(args)
    if not is_postgres_url(config.store.location) and not config.store.path.exists():
        raise CliError(f"store {config.store.path} does not exist yet: run certpub import first")
    print_status(config, now())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from store import migrate_store

    config = _config(args)
    before, after = migrate_store(config.store.location)
    if before == after:
        print(f"store {config.store.shown}: schema version {after}, nothing to do")
    else:
        print(f"store {config.store.shown}: schema version {before} -> {after}")
    return 0


def cmd_copy_store(args: argparse.Namespace) -> int:
    from store import is_postgres_url, open_store
    from store.copy import copy_store, destination_rows
    from store.sqlite import Store

    config = _config(args)
    if not is_postgres_url(config.store.location):
        raise CliError("copy-store copies into PostgreSQL: set [store] url in the configuration",
                       EXIT_CONFIG)
    source = Path(args.source)
    if is_postgres_url(args.source) or not source.is_file():
        raise CliError(f"--from {args.source}: not an SQLite store file", EXIT_USAGE)
    src = Store.open(source, create=False)
    try:
        dst = open_store(config.store.location, migrate=config.store.migrate == "auto")
        try:
            present = destination_rows(dst)  # asked again under the writer lock
            if present and not args.replace:
                raise CliError(f"destination {config.store.shown} is not empty ({present} rows):"
                               " give --replace to overwrite it")
            print(f"copying {source} into {config.store.shown}", file=sys.stderr)
            summary = copy_store(src, dst, replace=args.replace, every=args.every,
                                 progress=lambda line: print(line, file=sys.stderr))
        finally:
            dst.close()
    finally:
        src.close()
    print(summary.line())
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more; got {value}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo.run import run_demo

    return run_demo(Path(args.dir), ldap_port=args.ldap_port, http_port=args.http_port,
                    serve=not args.no_serve, fresh=args.fresh, hsm=args.hsm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certpub", description="Public repository of a CA: LDAP directory, OCSP responder, importer."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=str(DEFAULT_CONFIG_PATH),
                       help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
        return p

    p = with_config(sub.add_parser("serve", help="run the LDAP directory and the OCSP/HTTP server"))
    p.add_argument("--workers", "-w", type=_workers_arg, default=None, metavar="N",
                   help="processes sharing the listeners: 1 is a single process, 0 one per CPU "
                        "(default: [server] workers in the configuration, else one per CPU)")
    p.set_defaults(func=cmd_serve)
    p = with_config(sub.add_parser("importd", help="run the import daemon (spool folders, index.txt)"))
    p.add_argument("--once", action="store_true", help="exit when the spool is empty")
    p.set_defaults(func=cmd_importd)
    p = with_config(sub.add_parser("import", help="import certificates and CRLs once, then exit"))
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (default: the configured OpenSSL databases)")
    p.add_argument("--openssl", action="store_true", help="also import the configured OpenSSL databases")
    p.set_defaults(func=cmd_import)
    p = with_config(sub.add_parser("status", help="certificates per CA and status, CRLs, last import"))
    p.set_defaults(func=cmd_status)
    p = with_config(sub.add_parser("migrate", help="apply pending schema migrations to the store"))
    p.set_defaults(func=cmd_migrate)
    p = with_config(sub.add_parser("copy-store",
                                   help="copy an SQLite store into the configured PostgreSQL store"))
    p.add_argument("--from", dest="source", required=True, metavar="SQLITE_PATH",
                   help="the SQLite store file to copy")
    p.add_argument("--replace", action="store_true",
                   help="overwrite a destination that already holds data")
    p.add_argument("--every", type=_positive, default=10_000, metavar="N",
                   help="print progress every N rows (default 10000)")
    p.set_defaults(func=cmd_copy_store)
    p = with_config(sub.add_parser("check-config", help="validate the configuration, keys and signers"))
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("demo", help="create a demo PKI, import it and serve it on 127.0.0.1")
    p.add_argument("--dir", default="certpub-demo", help="folder for the demo PKI and store (default ./certpub-demo)")
    p.add_argument("--ldap-port", type=int, default=1389, help="LDAP port (default 1389)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port (default 8080)")
    p.add_argument("--no-serve", action="store_true", help="build and import, print the commands, do not serve")
    p.add_argument("--fresh", action="store_true", help="delete an existing demo folder first")
    p.add_argument("--hsm", action="store_true",
                   help="keep the OCSP signer keys in a SoftHSM2 token made in the demo folder"
                        " (PKCS#11; needs softhsm2)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"certpub: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CliError as exc:
        print(f"certpub: {exc}", file=sys.stderr)
        return exc.code
    except StoreError as exc:
        print(f"certpub: store error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader left (`certpub status | head`): not an error of ours; stdout is
        # pointed at /dev/null so the interpreter's final flush does not complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except Exception as exc:  # a bug: still one line, with where to look
        from server.errors import describe

        print(f"certpub: {describe(exc)}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

"""The ``[http]`` section, each CA's ``[ca.ocsp]`` signer table and the ``[pkcs11]`` table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.configtools import ConfigError, Section, check_key_file
from server.ocsp.p11uri import Pkcs11Uri, is_pkcs11_uri, parse_pkcs11_uri

MIN_VALIDITY = 8 * 3600.0  # CA/B Baseline Requirements 4.9.9
MAX_VALIDITY = 10 * 86400.0
# Connection limits of the HTTP listener, per process (each worker counts its own). Per
# address as [ldap]'s (100): one address can be a NAT or proxy in front of many clients. In
# total more than LDAP's 1000, as OCSP is the busy service; the process needs a descriptor
# limit (LimitNOFILE) above both totals, or accept() fails (EMFILE) before a limit refuses.
MAX_CONNECTIONS = 4096
MAX_CONNECTIONS_PER_ADDRESS = 100
SIGNING_PROCESSES = 1  # signing processes per worker (conf/certpub.example.toml says the same)


@dataclass(frozen=True)
class HttpConfig:
    listen: tuple[str, ...]  # Twisted endpoint strings; empty: no HTTP listener
    ocsp_paths: tuple[str, ...]
    max_request_bytes: int
    max_certids: int
    cache_entries: int = 100_000  # pre-signed responses kept (LRU)
    idle_timeout: float = 30.0  # seconds a keep-alive connection may stay silent
    max_connections: int = MAX_CONNECTIONS  # open at once; more are closed at once
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    # Signed OCSP requests (RFC 6960 §4.1.2): "ignore" | "verify" | "require"
    # (see server.ocsp.requestor).
    request_signatures: str = "ignore"
    # Overload (server.ocsp.signing). Requests that need a fresh signature are signed by
    # this many processes per worker; 0 signs in the server process (inline or in the store
    # threads). One default, here and in parse_http (SIGNING_PROCESSES): production forks.
    signing_processes: int = SIGNING_PROCESSES
    signing_queue: int = 256  # requests waiting for or being signed, per worker
    signing_queue_per_address: int = 64  # of those, from one client address
    shed_nonce_with_presigned: bool = True  # a full queue answers a nonce request with
    #                                         its certificate's pre-signed response
    unknown_cache_entries: int = 10_000  # signed answers about never-issued serials kept
    unknown_per_address: float = 20.0  # such answers signed per second per address
    # Host names the CA's certificates print in their http:// CRL distribution point,
    # freshest CRL and caIssuers URLs, lower-case (server.http.urls): requests for these
    # hosts are answered at the paths the certificates say.
    public_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class OcspSignerConfig:
    """How one CA's OCSP responses are signed and what they say."""

    signer_certificate: Path | None  # None: the CA signs with its own key
    signer_key: Path | Pkcs11Uri  # a PEM/DER file, or a key in a PKCS#11 token
    responder_id: str  # "by_key" | "by_name"
    rsa_padding: str  # "pkcs1v15" | "pss"
    validity: float  # seconds between thisUpdate and nextUpdate
    unknown_serials: str  # "unknown" | "revoked" (RFC 6960 §2.2 extended revoke)
    archive_cutoff: bool


# A DNS name (RFC 1123 labels), an IPv4 address or a bracketed IPv6 address; no port.
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*\.?"
                        r"|\[[0-9a-f:.]{2,45}\]")


def parse_public_names(sec: Section) -> tuple[str, ...]:
    """``[http] public_names``: host names only (no scheme, port or path), lower-cased."""
    names = sec.str_list("public_names", ())
    out: list[str] = []
    for i, name in enumerate(names):
        host = name.strip().lower().rstrip(".")
        if not host or _HOST_NAME.fullmatch(host) is None:
            raise ConfigError(f"{sec.key('public_names')}[{i}]",
                              "expected a host name as printed in the certificates' URLs"
                              f" (no scheme, port or path), e.g. \"crl.example.mo\"; got {name!r}")
        if host not in out:
            out.append(host)
    return tuple(out)


def parse_http(sec: Section) -> HttpConfig:
    paths = sec.str_list("ocsp_paths", ("/", "/ocsp"))
    for i, p in enumerate(paths):
        if not p.startswith("/"):
            raise ConfigError(f"{sec.key('ocsp_paths')}[{i}]", f"expected a path starting with '/'; got {p!r}")
    cfg = HttpConfig(
        listen=sec.str_list("listen", ("tcp:80",)),
        ocsp_paths=paths,
        max_request_bytes=sec.int("max_request_bytes", 65_536, min=1024, max=1024 * 1024),
        max_certids=sec.int("max_certids", 100, min=1, max=10_000),
        cache_entries=sec.int("cache_entries", 100_000, min=1, max=100_000_000),
        idle_timeout=sec.duration("idle_timeout", 30.0, min=1, max=3600),
        max_connections=sec.int("max_connections", MAX_CONNECTIONS, min=1, max=1_000_000),
        max_connections_per_address=sec.int("max_connections_per_address",
                                            MAX_CONNECTIONS_PER_ADDRESS, min=1, max=1_000_000),
        request_signatures=sec.str("request_signatures", "ignore",
                                   choices=("ignore", "verify", "require")),
        signing_processes=sec.int("signing_processes", SIGNING_PROCESSES, min=0, max=64),
        signing_queue=sec.int("signing_queue", 256, min=1, max=100_000),
        signing_queue_per_address=sec.int("signing_queue_per_address", 64, min=1,
                                          max=100_000),
        shed_nonce_with_presigned=sec.bool("shed_nonce_with_presigned", True),
        unknown_cache_entries=sec.int("unknown_cache_entries", 10_000, min=1,
                                      max=10_000_000),
        unknown_per_address=sec.float("unknown_per_address", 20.0, min=0.1, max=1e6),
        public_names=parse_public_names(sec),
    )
    if cfg.signing_queue_per_address > cfg.signing_queue:
        raise ConfigError(sec.key("signing_queue_per_address"),
                          f"expected at most signing_queue ({cfg.signing_queue}); got"
                          f" {cfg.signing_queue_per_address}")
    sec.done()
    return cfg


@dataclass(frozen=True)
class Pkcs11Config:
    """The ``[pkcs11]`` table: the token's library and where its user PIN comes from.

    The PIN itself is never kept here (nor anywhere a repr or a log could show it): it is read
    when the token is opened, from ``pin_file`` (owner-only, as key files) or ``pin_env``."""

    module: Path  # the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so
    pin_file: Path | None
    pin_env: str | None
    retry_interval: float = 1.0  # seconds between attempts to re-open a token that failed


def parse_pkcs11(sec: Section, *, check_files: bool = True) -> Pkcs11Config:
    cfg = Pkcs11Config(
        module=sec.path_("module"),
        pin_file=sec.path_("pin_file", None),
        pin_env=sec.str("pin_env", None),
        retry_interval=sec.duration("retry_interval", 1.0, min=0.05, max=300),
    )
    if (cfg.pin_file is None) == (cfg.pin_env is None):
        raise ConfigError(sec.key("pin_file"), "give either pin_file or pin_env (the token's"
                          " user PIN)")
    if cfg.pin_env is not None and not cfg.pin_env:
        raise ConfigError(sec.key("pin_env"), "expected the name of an environment variable")
    if check_files:
        if not cfg.module.is_file():
            raise ConfigError(sec.key("module"), f"file {cfg.module} does not exist or is not a"
                              " file (the token's PKCS#11 library)")
        if cfg.pin_file is not None:
            if not cfg.pin_file.is_file():
                raise ConfigError(sec.key("pin_file"), f"file {cfg.pin_file} does not exist or"
                                  " is not a file")
            check_key_file(cfg.pin_file, sec.key("pin_file"))
    sec.done()
    return cfg


def _signer_key(sec: Section) -> Path | Pkcs11Uri:
    raw = sec.str("signer_key")
    if is_pkcs11_uri(raw):
        return parse_pkcs11_uri(raw, sec.key("signer_key"))
    result: Path = sec.path_("signer_key")
    return result


def parse_signer(sec: Section, *, check_files: bool = True) -> OcspSignerConfig:
    cfg = OcspSignerConfig(
        signer_certificate=sec.path_("signer_certificate", None),
        signer_key=_signer_key(sec),
        responder_id=sec.str("responder_id", "by_key", choices=("by_key", "by_name")),
        rsa_padding=sec.str("rsa_padding", "pkcs1v15", choices=("pkcs1v15", "pss")),
        validity=sec.duration("validity", 86400.0, min=MIN_VALIDITY, max=MAX_VALIDITY),
        unknown_serials=sec.str("unknown_serials", "unknown", choices=("unknown", "revoked")),
        archive_cutoff=sec.bool("archive_cutoff", True),
    )
    if check_files:
        for key in ("signer_certificate", "signer_key"):
            path = getattr(cfg, key)
            if isinstance(path, Path) and not path.is_file():
                raise ConfigError(sec.key(key), f"file {path} does not exist or is not a file")
    sec.done()
    return cfg

"""The configuration: one TOML file into frozen dataclasses (``certpub check-config``).

Strategy: the root parses the sections it owns (store, import, ca, log, tls, server) and hands the
``ldap``, ``http`` and ``privacy`` tables to their modules' own parsers; every unknown key anywhere is an
error naming its path, and so is every missing file the configuration points at.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass
from pathlib import Path

from server.configtools import ConfigError, Section, check_key_file
from store import is_postgres_url, redact_location
from server.ldap.config import LdapConfig, parse_ldap
from server.ocsp.config import (
    HttpConfig,
    OcspSignerConfig,
    Pkcs11Config,
    parse_http,
    parse_pkcs11,
    parse_signer,
)
from server.ocsp.p11uri import Pkcs11Uri
from server.privacy import PrivacyConfig, parse_privacy

DEFAULT_CONFIG_PATH = Path("/etc/certpub/certpub.toml")
DEFAULT_STORE_PATH = Path("/var/lib/certpub/store.sqlite3")
MAX_WORKERS = 256


DEFAULT_PG_THREADS = 8


@dataclass(frozen=True)
class StoreConfig:
    """Where the store lives: an SQLite file (``path``) or a PostgreSQL database (``url``)."""

    path: Path
    url: str | None = None  # postgresql://…: the database the importer writes
    read_url: str | None = None  # servers read here (a replica); default: url
    threads: int = 0  # server threads for store calls; 0: calls run inline on the reactor
    migrate: str = "auto"  # "auto": migrate on open; "manual": `certpub migrate` only

    @property
    def location(self) -> str:
        """What the importer opens (and `certpub migrate`)."""
        return self.url or str(self.path)

    @property
    def read_location(self) -> str:
        """What the servers open."""
        return self.read_url or self.url or str(self.path)

    @property
    def shown(self) -> str:
        """The location for logs and messages, without a password."""
        from store import redact_location

        return redact_location(self.location)


@dataclass(frozen=True)
class OpensslDatabase:
    """An OpenSSL CA database: index.txt plus the folder of issued certificates."""

    ca: str
    index: Path
    certs_dir: Path


@dataclass(frozen=True)
class ImportConfig:
    spool: tuple[Path, ...]
    processed: str  # "move" (to <spool>/done) or "delete"
    poll_interval: float
    batch_size: int
    openssl: tuple[OpensslDatabase, ...]


@dataclass(frozen=True)
class CaConfig:
    name: str
    certificate: Path
    ocsp: OcspSignerConfig | None


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate for ldaps://, StartTLS and https:// (TLS 1.2 and newer only)."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class LogConfig:
    format: str  # "logfmt" | "json"
    file: Path | None  # None: standard output
    level: str


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table: process layout of ``certpub serve``."""

    workers: int = 0  # worker processes; 0: one per CPU (os.cpu_count())


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class OpsConfig:
    """The ``[ops]`` table: the staff-only listener of ``/metrics`` and ``/healthz``.

    ``listen``: Twisted endpoint strings (default none: the two paths are served nowhere until
    the operator picks an address). ``public_networks``: client networks that may also fetch
    them on the public ``[http]`` listener (default none: 404 there)."""

    listen: tuple[str, ...] = ()
    public_networks: tuple[Network, ...] = ()

    def public_allows(self, host: str) -> bool:
        """Whether a client at host (an IP address string) may fetch the ops paths on the
        public listener."""
        if not self.public_networks:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.public_networks)


def parse_ops(sec: Section) -> OpsConfig:
    """``[ops]``: endpoint strings and CIDR networks, each checked with its key path."""
    listen = sec.str_list("listen", ())
    networks: list[Network] = []
    for i, text in enumerate(sec.str_list("public_networks", ())):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            raise ConfigError(f"{sec.key('public_networks')}[{i}]",
                              f"expected a network such as 10.0.0.0/8 or 2001:db8::/32: {exc}"
                              ) from None
    sec.done()
    return OpsConfig(listen=listen, public_networks=tuple(networks))


@dataclass(frozen=True)
class Config:
    source: Path | None
    store: StoreConfig
    import_: ImportConfig
    cas: tuple[CaConfig, ...]
    ldap: LdapConfig
    http: HttpConfig
    tls: TlsConfig | None
    log: LogConfig
    server: ServerConfig = ServerConfig()
    pkcs11: Pkcs11Config | None = None  # the token library of pkcs11: signer keys
    privacy: PrivacyConfig = PrivacyConfig()  # the lookup policy (LDAP and the search pages)
    ops: OpsConfig = OpsConfig()

    def ca(self, name: str) -> CaConfig | None:
        return next((c for c in self.cas if c.name == name), None)


def _existing_file(section: Section, key: str, path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(section.key(key), f"file {path} does not exist or is not a file")
    return path


def parse_config(data: dict[str, object], source: Path | None = None, *,
                 check_files: bool = True) -> Config:
    """Validate a parsed TOML document; raises ConfigError naming the first bad key."""
    root = Section(data)

    st = root.section("store")
    url = st.str("url", None)
    read_url = st.str("read_url", None)
    for key, value in (("url", url), ("read_url", read_url)):
        if value is not None and not is_postgres_url(value):
            raise ConfigError(st.key(key), f"expected a postgresql:// URL; got {redact_location(value)!r}")
    if url is not None and st.has("path"):
        raise ConfigError(st.key("url"), "give either path (SQLite) or url (PostgreSQL), not both")
    if read_url is not None and url is None:
        raise ConfigError(st.key("read_url"), "read_url needs url (the database the importer writes)")
    store = StoreConfig(
        path=st.path_("path", DEFAULT_STORE_PATH),
        url=url,
        read_url=read_url,
        threads=st.int("threads", DEFAULT_PG_THREADS if url else 0, min=0, max=256),
        migrate=st.str("migrate", "auto", choices=("auto", "manual")),
    )
    st.done()

    cas: list[CaConfig] = []
    for sec in root.sections("ca"):
        name = sec.str("name")
        if not name or any(c in name for c in "/ \t"):
            raise ConfigError(sec.key("name"), f"expected a short name without spaces or '/'; got {name!r}")
        if any(c.name == name for c in cas):
            raise ConfigError(sec.key("name"), f"duplicate CA name {name!r}")
        cert = sec.path_("certificate")
        if check_files:
            _existing_file(sec, "certificate", cert)
        ocsp = parse_signer(sec.section("ocsp"), check_files=check_files) if sec.has("ocsp") else None
        sec.done()
        cas.append(CaConfig(name=name, certificate=cert, ocsp=ocsp))
    if not cas:
        raise ConfigError("ca", "at least one [[ca]] table is required")
    ca_names = {c.name for c in cas}

    im = root.section("import")
    dbs = []
    for sec in im.sections("openssl"):
        ca = sec.str("ca")
        if ca not in ca_names:
            raise ConfigError(sec.key("ca"), f"names no configured CA (known: {', '.join(sorted(ca_names))})")
        index = sec.path_("index")
        certs_dir = sec.path_("certs_dir", None) or index.parent / "newcerts"
        sec.done()
        dbs.append(OpensslDatabase(ca=ca, index=index, certs_dir=certs_dir))
    import_ = ImportConfig(
        spool=tuple(Path(p) for p in im.str_list("spool", ())),
        processed=im.str("processed", "move", choices=("move", "delete")),
        poll_interval=im.duration("poll_interval", 1.0, min=0.05, max=60),
        batch_size=im.int("batch_size", 500, min=1, max=100_000),
        openssl=tuple(dbs),
    )
    im.done()

    ldap = parse_ldap(root.section("ldap"))
    http = parse_http(root.section("http"))
    privacy = parse_privacy(root.section("privacy"))

    tls = None
    if root.has("tls"):
        t = root.section("tls")
        tls = TlsConfig(certificate=t.path_("certificate"), key=t.path_("key"))
        if check_files:
            _existing_file(t, "certificate", tls.certificate)
            _existing_file(t, "key", tls.key)
            check_key_file(tls.key, t.key("key"))
        t.done()

    lg = root.section("log")
    log = LogConfig(
        format=lg.str("format", "logfmt", choices=("logfmt", "json")),
        file=lg.path_("file", None),
        level=lg.str("level", "info", choices=("debug", "info", "warn", "error")),
    )
    lg.done()

    sv = root.section("server")
    server = ServerConfig(workers=sv.int("workers", 0, min=0, max=MAX_WORKERS))
    sv.done()
    ops = parse_ops(root.section("ops"))

    pkcs11 = (parse_pkcs11(root.section("pkcs11"), check_files=check_files)
              if root.has("pkcs11") else None)
    if pkcs11 is None:
        for i, ca_ in enumerate(cas):
            if ca_.ocsp is not None and isinstance(ca_.ocsp.signer_key, Pkcs11Uri):
                raise ConfigError(f"ca[{i}].ocsp.signer_key", "a pkcs11: key needs the [pkcs11]"
                                  " table (module, and pin_file or pin_env)")
    root.done()
    return Config(source=source, store=store, import_=import_, cas=tuple(cas), ldap=ldap,
                  http=http, tls=tls, log=log, server=server, pkcs11=pkcs11, privacy=privacy,
                  ops=ops)


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """Read and validate the configuration file at path."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read configuration {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from exc
    if not data:
        # The file as the Debian package installs it: every setting commented out.
        raise ConfigError("", f"{path} has no settings (every line is a comment or blank):"
                          " nothing to serve. Configure at least one [[ca]] (name,"
                          " certificate; [ca.ocsp] to answer OCSP) and the [ldap] / [http]"
                          " listeners; every key is described in the file")
    return parse_config(data, path, check_files=check_files)

"""The ``[ldap]`` section: listeners, naming contexts, the public attribute allowlist, limits."""

from __future__ import annotations

from dataclasses import dataclass

from server.configtools import ConfigError, Section

# The attributes the directory may ever show (DESIGN "only details marked public").
DEFAULT_ATTRIBUTES: tuple[str, ...] = (
    "objectClass", "cn", "sn", "givenName", "mail", "o", "ou", "c", "l", "st",
    "userCertificate", "cACertificate", "certificateRevocationList",
    "authorityRevocationList", "deltaRevocationList", "crossCertificatePair",
    "certpubStatus", "certpubRevocationTime", "certpubRevocationReason",
    "certpubSerialNumber", "certpubNotAfter", "certpubCA",
)


@dataclass(frozen=True)
class LdapConfig:
    listen: tuple[str, ...]  # Twisted endpoint strings; empty: no LDAP listener
    naming_contexts: tuple[str, ...]  # empty: derived from the CAs' names
    attributes: tuple[str, ...]  # the public attribute allowlist
    size_limit: int
    time_limit: float
    max_request_bytes: int
    # Added by the directory itself (all optional in the TOML file).
    max_connections: int = 1000
    max_connections_per_address: int = 100
    idle_timeout: float = 300.0
    max_filter_depth: int = 100
    max_filter_items: int = 1000
    scan_limit: int = 20_000  # entries a search without an indexable filter may examine
    max_outstanding: int = 16  # concurrent operations per connection
    answer_cache_mib: int = 32  # pre-encoded search answers kept (server.ldap.answers); 0: off


def parse_ldap(sec: Section) -> LdapConfig:
    cfg = LdapConfig(
        listen=sec.str_list("listen", ("tcp:389",)),
        naming_contexts=sec.str_list("naming_contexts", ()),
        attributes=sec.str_list("attributes", DEFAULT_ATTRIBUTES),
        size_limit=sec.int("size_limit", 500, min=1, max=100_000),
        time_limit=sec.duration("time_limit", 10.0, min=0.1, max=3600),
        max_request_bytes=sec.int("max_request_bytes", 1_048_576, min=1024, max=16 * 1024 * 1024),
        max_connections=sec.int("max_connections", 1000, min=1, max=1_000_000),
        max_connections_per_address=sec.int("max_connections_per_address", 100, min=1,
                                             max=1_000_000),
        idle_timeout=sec.duration("idle_timeout", 300.0, min=1, max=86_400),
        max_filter_depth=sec.int("max_filter_depth", 100, min=2, max=256),
        max_filter_items=sec.int("max_filter_items", 1000, min=2, max=100_000),
        scan_limit=sec.int("scan_limit", 20_000, min=1, max=10_000_000),
        max_outstanding=sec.int("max_outstanding", 16, min=1, max=1000),
        answer_cache_mib=sec.int("answer_cache_mib", 32, min=0, max=65536),
    )
    from server.ldap.schema import unknown_attributes  # the schema decides what exists

    unknown = unknown_attributes(cfg.attributes)
    if unknown:
        raise ConfigError(sec.key("attributes"),
                          f"unknown attribute type(s) {', '.join(unknown)}")
    for i, context in enumerate(cfg.naming_contexts):
        from store import names

        try:
            names.parse(context)
        except names.DNSyntaxError as exc:
            raise ConfigError(f"{sec.key('naming_contexts')}[{i}]", str(exc)) from exc
    sec.done()
    return cfg

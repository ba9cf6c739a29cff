"""The ``[ldap]`` section: listeners, naming contexts, the public attribute allowlist, limits."""

from __future__ import annotations

from dataclasses import dataclass

from server.configtools import Section

# The attributes the directory may ever show (DESIGN "only details marked public").
DEFAULT_ATTRIBUTES: tuple[str, ...] = (
    "objectClass", "cn", "sn", "givenName", "mail", "o", "ou", "c", "l", "st",
    "userCertificate", "cACertificate", "certificateRevocationList",
    "authorityRevocationList", "crossCertificatePair",
    "certpubStatus", "certpubRevocationTime", "certpubRevocationReason",
    "certpubSerialNumber", "certpubNotAfter",
)


@dataclass(frozen=True)
class LdapConfig:
    listen: tuple[str, ...]  # Twisted endpoint strings; empty: no LDAP listener
    naming_contexts: tuple[str, ...]  # empty: derived from the CAs' names
    attributes: tuple[str, ...]  # the public attribute allowlist
    size_limit: int
    time_limit: float
    max_request_bytes: int


def parse_ldap(sec: Section) -> LdapConfig:
    cfg = LdapConfig(
        listen=sec.str_list("listen", ("tcp:389",)),
        naming_contexts=sec.str_list("naming_contexts", ()),
        attributes=sec.str_list("attributes", DEFAULT_ATTRIBUTES),
        size_limit=sec.int("size_limit", 500, min=1, max=100_000),
        time_limit=sec.duration("time_limit", 10.0, min=0.1, max=3600),
        max_request_bytes=sec.int("max_request_bytes", 262_143, min=1024, max=16 * 1024 * 1024),
    )
    sec.done()
    return cfg

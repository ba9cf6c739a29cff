"""The lookup policy (``[privacy]``): a directory that answers lookups, not dumps — one rule
for LDAP and the search pages — and the per-client budget of entries shown.

Strategy: ``reach`` judges a whole LDAP filter by what it can match at most, from its
indexed parts: an equality on ``mail`` or ``cn``, a certificate or serial assertion is
*exact*; an equality on ``sn``/``givenName`` or a substring/prefix of ``cn``, ``sn``,
``givenName`` or ``mail`` is *typed*, as narrow as its longest typed piece in characters
(for ``mail`` only the local part counts: ``*@example.mo`` narrows nothing); everything
else — a presence test, NOT, an ordering, ``o``/``ou``/``c``/``l``/``st``, an attribute
outside the allowlist — is *unbounded*. An AND is as narrow as its narrowest part, an OR as
broad as its broadest. ``lookups = "typed"`` (the default) accepts exact filters and typed
ones with at least ``min_chars`` characters (``min_chars_cjk`` when the text holds a CJK
character: a two-character Chinese name is a precise lookup); ``"exact"`` accepts exact ones
only; ``"open"`` accepts everything. ``LdapRule`` is the decision for one search: a base-object
read (Java's CertStore, CRL distribution points) is always allowed; a one-level or subtree
search whose filter is not narrow enough is refused at once when the store's index would
serve it (it can only list subscribers), else it may list the DIT's glue, CA and CRL entries
and ends with unwillingToPerform at the first subscriber entry it would return; an allowed
search returns at most ``max_entries`` entries (then sizeLimitExceeded, as slapd).

The budget: a token bucket per client address (IPv6: per /64) and one per network (IPv4 /24,
IPv6 /56, ``network_budget`` times as large) count the subscriber entries a client is shown
(LDAP entries, search-page rows). An answer whose filter names the address of every entry it
returns (``(mail=ADDR)``, Thunderbird's S/MIME lookup) shows no address the client did not
already have and costs nothing; CA, CRL and glue entries cost nothing. Past the budget: LDAP
busy, HTTP 429 with Retry-After; one log line per address per minute. Addresses in ``exempt``
(an operator's network) are not judged, capped or counted. Pure except for ``Privacy``, which
holds the buckets, the metrics and the log.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from functools import lru_cache
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from server.configtools import ConfigError, Section
from server.ldap.filters import (
    And,
    Extensible,
    Filter,
    Match,
    Or,
    Substrings,
    substring_parts,
)
from server.ldap.plan import plan
from server.ldap.schema import RULE_BY_KEY, Allowlist, describe
from server.limits import TokenBuckets, network_of
from store import names

log = Logger(namespace="certpub.privacy")

MODES = ("exact", "typed", "open")
EXACT_EQUALITY = frozenset({"mail", "cn", "userCertificate", "certpubSerialNumber"})
TYPED = frozenset({"mail", "cn", "sn", "givenName"})
PRIVATE_KINDS = frozenset({"subject", "cert"})  # entries that show a subscriber
LOG_EVERY = 60.0  # seconds between two budget lines about one address
V4_NETWORK, V6_ADDRESS, V6_NETWORK = 24, 64, 56
# reasons (the ``reason`` label of certpub_privacy_refusals)
UNBOUNDED, TOO_SHORT, NOT_EXACT, PAGING, BUDGET = (
    "unbounded", "too_short", "not_exact", "paging", "budget")


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``[privacy]`` table."""

    lookups: str = "typed"
    min_chars: int = 3
    min_chars_cjk: int = 2
    max_entries: int = 100
    paging: bool = False
    exempt: tuple[str, ...] = ()
    budget: int = 400  # entries one address may be shown at once
    budget_per_minute: int = 480  # and more each minute; 0: no budget
    network_budget: int = 4  # a network's budget, in addresses' budgets; 0: none

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.exempt)


def parse_privacy(sec: Section) -> PrivacyConfig:
    cfg = PrivacyConfig(
        lookups=sec.str("lookups", "typed", choices=MODES),
        min_chars=sec.int("min_chars", 3, min=1, max=64),
        min_chars_cjk=sec.int("min_chars_cjk", 2, min=1, max=64),
        max_entries=sec.int("max_entries", 100, min=1, max=100_000),
        paging=sec.bool("paging", False),
        exempt=sec.str_list("exempt", ()),
        budget=sec.int("budget", 400, min=1, max=10_000_000),
        budget_per_minute=sec.int("budget_per_minute", 480, min=0, max=10_000_000),
        network_budget=sec.int("network_budget", 4, min=0, max=1_000_000),
    )
    for i, net in enumerate(cfg.exempt):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{sec.key('exempt')}[{i}]",
                              f"expected a network such as 192.0.2.0/24; got {net!r}") from None
    sec.done()
    return cfg


# --- judging a filter ------------------------------------------------------------------------


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x3FFFF)


@dataclass(frozen=True, order=True)
class Reach:
    """How narrow a filter is: ``rank`` 3 exact, 2 typed enough, 1 typed too short,
    0 unbounded; ``chars`` typed (for 1 and 2); ``pinned``: every entry it can match has one
    of the mail addresses it names."""

    rank: int
    chars: int = 0
    pinned: bool = False


EXACT = Reach(3)
NOTHING = Reach(0)


def typed(text: str, cfg: PrivacyConfig) -> Reach:
    """The reach of a typed piece of text (whitespace does not count)."""
    chars = sum(1 for ch in text if not ch.isspace())
    if not chars:
        return NOTHING
    needed = cfg.min_chars_cjk if any(is_cjk(ch) for ch in text) else cfg.min_chars
    return Reach(2 if chars >= needed else 1, chars)


def _local(piece: str, final: bool = False) -> str:
    """What of a mail substring narrows: its local part (a final piece without ``@`` is in
    the domain)."""
    if "@" in piece:
        return piece.split("@", 1)[0]
    return "" if final else piece


def reach(f: Filter, cfg: PrivacyConfig, allow: Allowlist) -> Reach:
    """What a filter can match at most (see the module docstring)."""
    if isinstance(f, And):
        parts = [reach(item, cfg, allow) for item in f.items]
        best = max(parts, default=NOTHING)
        return Reach(best.rank, best.chars, any(p.pinned for p in parts))
    if isinstance(f, Or):
        parts = [reach(item, cfg, allow) for item in f.items]
        worst = min(parts, default=NOTHING)
        return Reach(worst.rank, worst.chars, bool(parts) and all(p.pinned for p in parts))
    if isinstance(f, Match) and f.op in ("=", "~="):
        return _equality(f.attr, f.value, cfg, allow)
    if isinstance(f, Extensible):
        rule = RULE_BY_KEY.get(f.rule.strip().lower()) if f.rule else None
        if f.attr is None or f.dn_attributes or rule not in (None, "certificateExactMatch",
                                                             "caseIgnoreMatch",
                                                             "caseIgnoreIA5Match"):
            return NOTHING
        return _equality(f.attr, f.value, cfg, allow)
    if isinstance(f, Substrings):
        name = _public(f.attr, allow)
        parts = substring_parts(f)
        if name not in TYPED or parts is None:
            return NOTHING
        initial, any_, final = parts
        if name == "mail":
            pieces = [_local(initial), *(_local(a) for a in any_), _local(final, True)]
        else:
            pieces = [initial, *any_, final]
        return max((typed(p, cfg) for p in pieces), default=NOTHING)
    return NOTHING  # presence, NOT, ordering, an unknown or hidden attribute


@lru_cache(maxsize=1024)
def _public(attr: str, allow: Allowlist) -> str | None:
    t, ok = describe(attr)
    if t is None or not ok or not allow.allows(t):
        return None
    return t.name


def _equality(attr: str, value: bytes, cfg: PrivacyConfig, allow: Allowlist) -> Reach:
    name = _public(attr, allow)
    if name in EXACT_EQUALITY:
        return Reach(3, pinned=name == "mail")
    if name in TYPED:
        try:
            return typed(names.prep_value(value.decode("utf-8")), cfg)
        except UnicodeDecodeError:
            return NOTHING
    return NOTHING


# --- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LdapRule:
    """What the policy makes of one search: refused (``reason`` and ``message``), or run with
    at most ``cap`` entries (None: no cap), ``structural`` (glue, CA and CRL entries only:
    the first subscriber entry ends it refused), and whether its entries cost budget."""

    reason: str = ""  # why it is refused (structural: why its subscriber entries are)
    message: str = ""
    cap: int | None = None
    structural: bool = False
    free: bool = False  # the filter names every entry's address (and costs nothing)
    paging: bool = True  # the paged-results control is honoured

    @property
    def refused(self) -> bool:
        return bool(self.reason) and not self.structural


OPEN = LdapRule()


def message(reason: str, cfg: PrivacyConfig) -> str:
    """The diagnostic message of a refusal, naming the policy."""
    if reason == NOT_EXACT:
        return ("privacy policy (lookups=exact): only exact lookups are answered: by e-mail"
                " address, name, certificate or serial number")
    if reason == TOO_SHORT:
        return (f"privacy policy (lookups={cfg.lookups}): type at least {cfg.min_chars}"
                f" characters ({cfg.min_chars_cjk} in Chinese, Japanese or Korean) of a name"
                " or e-mail address")
    if reason == PAGING:
        return "privacy policy: paged results are not offered to anonymous clients"
    if reason == BUDGET:
        return "privacy policy: too many entries shown to this address; try again later"
    return (f"privacy policy (lookups={cfg.lookups}): the directory answers lookups, not"
            " listings: search by e-mail address or name")


def _short_of(r: Reach, cfg: PrivacyConfig) -> str:
    """The refusal reason for a filter of this reach, or "" when allowed."""
    if cfg.lookups == "open" or r.rank == 3:
        return ""
    if cfg.lookups == "exact":
        return NOT_EXACT
    return "" if r.rank == 2 else (TOO_SHORT if r.rank == 1 else UNBOUNDED)


def ldap_rule(f: Filter, scope: int, paged_critical: bool | None, cfg: PrivacyConfig,
              allow: Allowlist) -> LdapRule:
    """The policy for a search by a client that is not exempt (``paged_critical``: None
    without the paged-results control, else whether it is critical)."""
    r = reach(f, cfg, allow)
    free = r.pinned
    if cfg.lookups == "open":
        return LdapRule(free=free)
    paging = cfg.paging
    if paged_critical and not paging:
        return LdapRule(PAGING, message(PAGING, cfg))
    if scope == 0:  # a read of a named entry
        return LdapRule(free=free, paging=paging)
    reason = _short_of(r, cfg)
    if not reason:
        return LdapRule(cap=None if paging and paged_critical is not None else cfg.max_entries,
                        free=free, paging=paging)
    if plan(f, allow) is not None:  # the index serves it: it can only list subscribers
        return LdapRule(reason, message(reason, cfg))
    return LdapRule(reason, message(reason, cfg), cap=cfg.max_entries, structural=True,
                    free=free, paging=paging)


def web_rule(name: str | None, mail: str | None, exact: bool, cfg: PrivacyConfig
             ) -> tuple[str, bool]:
    """(refusal reason or "", whether the name part may be searched) for a search-page query:
    ``name`` the name prefix, ``mail`` the address, ``exact`` a serial or fingerprint."""
    if cfg.lookups == "open" or not name:
        return "", bool(name)
    reason = _short_of(typed(name, cfg), cfg)
    if not reason:
        return "", True
    if mail or exact:  # the exact part of the query still runs
        return "", False
    return reason, False


# --- the process's state ---------------------------------------------------------------------


class Privacy:
    """The policy, the budget buckets, the refusal counts and the budget log of one process."""

    def __init__(self, config: PrivacyConfig, allow: Allowlist, *, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allow = allow
        self.metrics = metrics
        self.clock = clock
        self.refusals: dict[tuple[str, str], int] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # address -> (logged at, since)
        self.configure(config)

    def configure(self, config: PrivacyConfig) -> None:
        """New settings (start, SIGHUP); the buckets keep what they hold if sizes stay."""
        self.config = config
        self._exempt = config.networks()
        self._exempt_cache: dict[str, bool] = {}
        rate = config.budget_per_minute / 60.0
        old = getattr(self, "addresses", None)
        if old is None or (old.size, old.rate) != (config.budget, rate):
            self.addresses = TokenBuckets(config.budget, rate, clock=self.clock)
            k = config.network_budget
            self.networks = TokenBuckets(config.budget * k, rate * k, clock=self.clock)

    @property
    def budgeted(self) -> bool:
        return self.config.budget_per_minute > 0

    def exempt(self, host: str) -> bool:
        """host is in an exempt network (its searches are not judged, capped or counted)."""
        found = self._exempt_cache.get(host)
        if found is None:
            try:
                ip = ipaddress.ip_address(host)
                found = any(ip in net for net in self._exempt)
            except ValueError:
                found = False
            if len(self._exempt_cache) > 10_000:
                self._exempt_cache.clear()
            self._exempt_cache[host] = found
        return found

    def _keys(self, host: str) -> tuple[str, str]:
        if ":" in host:
            return network_of(host, 32, V6_ADDRESS), network_of(host, 32, V6_NETWORK)
        return host, network_of(host, V4_NETWORK, V6_NETWORK)

    def wait(self, host: str) -> float:
        """Seconds host must wait before it may be shown entries again (0: it may now)."""
        if not self.budgeted:
            return 0.0
        address, network = self._keys(host)
        wait = self.addresses.wait(address)
        if self.config.network_budget:
            wait = max(wait, self.networks.wait(network))
        return wait

    def charge(self, host: str, entries: int) -> None:
        """host was shown this many subscriber entries."""
        if entries <= 0 or not self.budgeted:
            return
        address, network = self._keys(host)
        self.addresses.take(address, entries)
        if self.config.network_budget:
            self.networks.take(network, entries)

    def over_budget(self, host: str, protocol: str) -> float:
        """The wait (seconds, > 0) when host is past its budget — counted and logged (one
        line per address per minute) — else 0."""
        wait = self.wait(host)
        if wait > 0:
            self.throttled(host, protocol, wait)
        return wait

    def throttled(self, host: str, protocol: str, wait: float) -> None:
        """Count a request refused for the budget; one log line per address per minute."""
        self.refused(protocol, BUDGET)
        now = self.clock()
        at, since = self._logged.get(host, (-LOG_EVERY, 0))
        if now - at < LOG_EVERY:
            self._logged[host] = (at, since + 1)
            return
        if len(self._logged) > 10_000:
            self._logged = {h: v for h, v in self._logged.items() if now - v[0] < LOG_EVERY}
        self._logged[host] = (now, 0)
        log.info("privacy budget: IP={client} was shown its budget of {budget} entries"
                 " (+{per_minute}/min); refusing for {wait:.0f}s ({since} more refused since"
                 " the last line)", client=host, budget=self.config.budget,
                 per_minute=self.config.budget_per_minute, wait=wait, since=since + 1)

    def refused(self, protocol: str, reason: str) -> None:
        """Count one refusal (``certpub_privacy_refusals{protocol, reason}``)."""
        key = (protocol, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        counter = getattr(self.metrics, "privacy_refusals", None)
        if counter is not None:
            counter.labels(protocol, reason).inc()

    def ldap(self, f: Filter, scope: int, paged_critical: bool | None) -> LdapRule:
        return ldap_rule(f, scope, paged_critical, self.config, self.allow)


class WebGuard:
    """The policy and budget as the search pages apply them to one client's search."""

    def __init__(self, privacy: Privacy, host: str) -> None:
        self.privacy = privacy
        self.host = host

    @property
    def config(self) -> PrivacyConfig:
        return self.privacy.config

    def judge(self, name: str | None, mail: str | None, exact: bool) -> tuple[str, bool]:
        """(refusal reason or "", whether the name part may be searched); a refusal is
        counted."""
        reason, keep = web_rule(name, mail, exact, self.config)
        if reason:
            self.privacy.refused("http", reason)
        return reason, keep

    @property
    def cap(self) -> int:
        return self.config.max_entries

    def charge(self, rows: int) -> None:
        self.privacy.charge(self.host, rows)

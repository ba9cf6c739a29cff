"""The lookup policy (``[privacy]``, server.privacy) against real clients: ldapsearch and
ldap3 on a listener over the demo store, on SQLite and PostgreSQL, with the pre-encoded
answers on (so the policy is shown to apply before a kept answer is served).

Every client shape of DESIGN "The directory (LDAP)" keeps working under the default; the
harvests a new user would try — presence, paged, one-letter prefix — are refused or capped;
what comes back never exceeds the cap nor leaves the allowlist; a client past its budget
gets busy while lookups by address go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor, threads

from server.ldap.config import DEFAULT_ATTRIBUTES
from server.ldap.schema import Allowlist
from server.ldap.server import make_ldap_factory
from server.metrics import Metrics
from server.privacy import Privacy, PrivacyConfig
from server.storeaccess import StoreAccess
from tests.conftest import require_tool
from tests.ldap.conftest import ldap_config
from tests.ldap.test_directory import java_dn
from tests.ldap.test_integration import der, ldif, run

pytestmark = pytest.mark.realclient

AUTOCOMPLETE = "(|(cn=*{v}*)(mail=*{v}*)(givenName=*{v}*)(sn=*{v}*))"
OUTLOOK = "(&(mail=*)(|(mail={v}*)(|(cn={v}*)(|(sn={v}*)(givenName={v}*)))))"


class Feed:
    """A change feed that never reports a change: the answer cache stays on."""

    healthy = True

    def subscribe(self, fn: Callable[..., Any]) -> None:
        pass


class Served:
    """A listener with its policy, its metrics and its port."""

    def __init__(self, port: int, privacy: Privacy, metrics: Metrics) -> None:
        self.port = port
        self.privacy = privacy
        self.metrics = metrics

    def search(self, *args: str) -> list[str]:
        return [require_tool("ldapsearch"), "-x", "-LLL", "-o", "ldif-wrap=no",
                "-H", f"ldap://127.0.0.1:{self.port}", *args]

    def refusals(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "certpub_privacy_refusals_total", {"protocol": "ldap", "reason": reason})
        return value or 0.0


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, ldap_store_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("ldap_pg_url"))
    return str(ldap_store_path)


@pytest.fixture
def serve(location: str, demo_now: datetime) -> Iterator[Callable[..., Served]]:
    """serve(**privacy settings): a listener under that policy (the default: none given)."""
    from store import open_store

    started: list[tuple[Any, StoreAccess, Any]] = []

    def make(**settings: Any) -> Served:
        serving = open_store(location, create=False, migrate=False)
        threads_ = 2 if location.startswith("postgresql") else 0
        access = StoreAccess(location, threads_, store=serving)
        access.start()
        metrics = Metrics(process=False)
        privacy = Privacy(PrivacyConfig(**settings), Allowlist.of(DEFAULT_ATTRIBUTES),
                          metrics=metrics)
        factory = make_ldap_factory(ldap_config(size_limit=500), serving, Feed(), None,
                                    lambda: demo_now, access=access, metrics=metrics,
                                    privacy=privacy)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        started.append((listening, access, serving))
        return Served(listening.getHost().port, privacy, metrics)

    yield make
    for listening, access, serving in started:
        pytest_twisted.blockon(listening.stopListening())
        access.stop()
        serving.close()


def good(demo_pki: Any) -> list[Any]:
    return [c for c in demo_pki.certs if c.state == "good" and c.emails]


@pytest_twisted.ensureDeferred
async def test_every_client_shape_works_under_the_default(serve: Callable[..., Served],
                                                          demo_pki: Any) -> None:
    s = serve()
    certs = good(demo_pki)
    # Thunderbird's S/MIME lookup, one address and several
    r = await run(*s.search("-b", "c=MO", f"(mail={certs[0].emails[0]})",
                            "usercertificate;binary"))
    assert r.returncode == 0, r.stderr
    assert ldif(r.stdout)[0]["usercertificate;binary"] == [der(certs[0])]
    both = f"(|(mail={certs[0].emails[0]})(mail={certs[1].emails[0]}))"
    r = await run(*s.search("-b", "c=MO", both, "usercertificate;binary"))
    assert r.returncode == 0 and len(ldif(r.stdout)) >= 2, r.stderr
    # Thunderbird's autocomplete (lower-cased, size limit 100), Latin and Chinese
    for v in ("ana", "chan", "陳大"):
        r = await run(*s.search("-z", "100", "-b", "c=MO", AUTOCOMPLETE.format(v=v), "cn",
                                "mail"))
        assert r.returncode == 0 and ldif(r.stdout), (v, r.returncode, r.stderr)
    # Outlook's address book
    r = await run(*s.search("-b", "c=MO", OUTLOOK.format(v="ana"), "cn", "mail"))
    found = ldif(r.stdout)
    assert r.returncode == 0 and found and all("mail" in e for e in found), r.stderr
    # Java's CertStore: a base-object read at the subject DN (OID=#hex spelling)
    java = next(c for c in certs if "1.2.840.113549.1.9.1" in c.subject_rfc4514)
    r = await run(*s.search("-s", "base", "-b", java_dn(java), "(objectClass=*)",
                            "userCertificate;binary", "crossCertificatePair;binary"))
    assert r.returncode == 0 and ldif(r.stdout)[0]["usercertificate;binary"] == [der(java)]
    # a CRL distribution point / AIA read at the CA's DN
    ca = demo_pki.cas["rsa-ca"]
    cert = ca.load_certificate()
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes()).public_bytes(Encoding.DER)
    r = await run(*s.search("-s", "base", "-b", cert.subject.rfc4514_string(),
                            "(objectClass=*)", "cACertificate;binary",
                            "certificateRevocationList;binary"))
    assert r.returncode == 0, r.stderr
    assert ldif(r.stdout)[0]["certificaterevocationlist;binary"] == [crl]
    # the DIT's structure stays browsable: the entries below c=MO are glue or CA entries
    r = await run(*s.search("-s", "one", "-b", "c=MO", "(objectClass=*)", "1.1"))
    assert r.returncode == 0 and ldif(r.stdout), r.stderr
    # and the CA entries can be found
    r = await run(*s.search("-b", "c=MO", "(objectClass=pkiCA)", "1.1"))
    assert r.returncode == 0 and len(ldif(r.stdout)) >= len(demo_pki.cas), r.stderr
    assert s.refusals("unbounded") == s.refusals("too_short") == 0


@pytest_twisted.ensureDeferred
async def test_harvests_are_refused_with_an_answer_naming_the_policy(
        serve: Callable[..., Served]) -> None:
    s = serve()
    attempts = [
        ("unbounded", ["-b", "c=MO", "(mail=*)", "mail"]),
        ("unbounded", ["-E", "pr=10/noprompt", "-b", "c=MO", "(mail=*)", "mail"]),
        ("unbounded", ["-E", "pr=10/noprompt", "-b", "c=MO", "(objectClass=*)", "mail"]),
        ("unbounded", ["-b", "c=MO", "(objectClass=*)", "mail"]),
        ("unbounded", ["-b", "c=MO", "(mail=*@example.mo)", "mail"]),
        ("too_short", ["-b", "c=MO", "(mail=a*)", "mail"]),
        ("too_short", ["-b", "c=MO", AUTOCOMPLETE.format(v="a"), "mail"]),
        ("too_short", ["-b", "c=MO", OUTLOOK.format(v="c"), "mail"]),
        ("too_short", ["-b", "c=MO", "(cn=陳*)", "mail"]),
        ("paging", ["-E", "!pr=10/noprompt", "-b", "c=MO", "(mail=ana.fonseca@*)", "mail"]),
    ]
    for reason, args in attempts:
        before = s.refusals(reason)
        r = await run(*s.search(*args))
        assert r.returncode == 53, (args, r.returncode, r.stderr)
        assert b"privacy policy" in r.stderr, r.stderr
        assert all("mail" not in e for e in ldif(r.stdout)), args  # no subscriber listed
        assert s.refusals(reason) == before + 1, (reason, args)
    # a non-critical paged control on a lookup: answered without paging
    r = await run(*s.search("-E", "pr=10/noprompt", "-b", "c=MO", OUTLOOK.format(v="ana"),
                            "mail"))
    assert r.returncode == 0 and ldif(r.stdout), r.stderr


@pytest_twisted.ensureDeferred
async def test_what_comes_back_is_capped_and_allowlisted(serve: Callable[..., Served],
                                                        demo_pki: Any) -> None:
    import ldap3

    s = serve(max_entries=2, exempt=("127.0.0.2/32",))
    query = AUTOCOMPLETE.format(v="exa")  # every demo address is @….example.mo

    def searches() -> tuple[list[Any], tuple[int, list[Any]], list[Any]]:
        server = ldap3.Server("127.0.0.1", port=s.port, get_info=ldap3.NONE)
        exempt = ldap3.Connection(server, auto_bind=True, source_address="127.0.0.2")
        judged = ldap3.Connection(server, auto_bind=True)
        # the exempt client first: its (uncapped) answer must not be served from the
        # answer cache to the judged client asking the same bytes
        exempt.search("c=MO", query, attributes=["cn", "mail", "telephoneNumber", "street"])
        full = list(exempt.response)
        judged.search("c=MO", query, attributes=["cn", "mail", "telephoneNumber", "street"])
        capped = (judged.result["result"], list(judged.response))
        judged.search("c=MO", query, attributes=["*", "+"])
        every = list(judged.response)
        exempt.unbind()
        judged.unbind()
        return full, capped, every

    full, (code, capped), every = await threads.deferToThread(searches)
    assert len(full) > 2
    assert code == 4 and len(capped) == 2  # sizeLimitExceeded with the capped entries
    allowed = {a.lower() for a in DEFAULT_ATTRIBUTES}
    for entry in [*capped, *every]:
        names = {a.split(";")[0].lower() for a, v in entry["raw_attributes"].items() if v}
        assert names <= allowed, names
    assert len(every) == 2
    # ldapsearch from the judged side sees the cap too (its own limit is larger)
    r = await run(*s.search("-z", "100", "-b", "c=MO", query, "mail"))
    assert r.returncode == 4 and len(ldif(r.stdout)) == 2


@pytest_twisted.ensureDeferred
async def test_an_exempt_operator_can_list_and_page(serve: Callable[..., Served]) -> None:
    s = serve(exempt=("127.0.0.0/8",))
    r = await run(*s.search("-b", "c=MO", "(mail=*)", "mail"))
    everything = ldif(r.stdout)
    assert r.returncode == 0 and len(everything) > 20, r.stderr
    r = await run(*s.search("-E", "pr=7/noprompt", "-b", "c=MO", "(mail=*)", "mail"))
    assert r.returncode == 0 and len([e for e in ldif(r.stdout) if "dn" in e]) == len(everything)


@pytest_twisted.ensureDeferred
async def test_past_the_budget_searches_get_busy_but_lookups_by_address_go_on(
        serve: Callable[..., Served], demo_pki: Any) -> None:
    s = serve(budget=3, budget_per_minute=1, network_budget=0)
    query = AUTOCOMPLETE.format(v="exa")
    r = await run(*s.search("-b", "c=MO", query, "mail"))  # entries up to the budget, then busy
    assert r.returncode == 51 and len(ldif(r.stdout)) == 3, r.stderr
    for _ in range(2):
        r = await run(*s.search("-b", "c=MO", query, "mail"))
        assert r.returncode == 51 and b"privacy policy" in r.stderr, (r.returncode, r.stderr)
        assert not ldif(r.stdout)
    assert s.refusals("budget") == 3
    mail = good(demo_pki)[0].emails[0]
    for _ in range(5):  # shows no address the client did not have: costs nothing
        r = await run(*s.search("-b", "c=MO", f"(mail={mail})", "usercertificate;binary"))
        assert r.returncode == 0 and len(ldif(r.stdout)) == 1, r.stderr
    # the CA entries and the CRL stay readable
    cert = demo_pki.cas["rsa-ca"].load_certificate()
    r = await run(*s.search("-s", "base", "-b", cert.subject.rfc4514_string(),
                            "(objectClass=*)", "certificateRevocationList;binary"))
    assert r.returncode == 0, r.stderr

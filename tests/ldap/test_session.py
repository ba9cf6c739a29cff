"""The LDAP session message by message, without a socket or a reactor: BER vectors in
(tests/vectors/ldap), result codes and entries out (decoded by ldaptor, an independent codec)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from server.ldap import codec
from server.ldap.answers import AnswerCache, split_message_id
from server.ldap.config import LdapConfig
from server.ldap.directory import Directory
from server.ldap.errors import AdminLimitExceeded, NoSuchObject, ProtocolError, ResultCode
from server.ldap.schema import Allowlist
from server.ldap.session import Job, Reply, Session, outcome
from store import names, open_store
from store.sqlbase import StoreError
from tests.ldap.ber import decode
from tests.ldap.conftest import ldap_config
from tests.ocsp.helpers import T0, fill_store, make_ca

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "ldap"
def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failures: list[Any] = []

    def info(self, format: str, **kwargs: Any) -> None:
        self.lines.append(format.format(**kwargs))

    def failure(self, format: str, failure: Any, **kwargs: Any) -> None:
        self.failures.append(failure)


@dataclass
class Service:
    """What a session needs, without Twisted: the directory, the answers, a fixed clock."""

    config: LdapConfig
    directory: Directory
    answers: AnswerCache
    tls: Any = None
    recorded: list[tuple[str, int]] = field(default_factory=list)
    now: datetime = T0
    ticks: float = 0.0

    def clock(self) -> datetime:
        return self.now

    def timer(self) -> float:
        return self.ticks

    def record(self, operation: str, code: int, seconds: float) -> None:
        self.recorded.append((operation, code))

    def record_cache(self, hit: bool) -> None:
        self.answers.count(hit)

    def answers_current(self) -> bool:
        return True


@pytest.fixture
def service(store_location: str, tmp_path: Path) -> Iterator[Service]:
    ca = make_ca(tmp_path / "ca", "session")
    for serial in (1, 2, 3):
        ca.subscriber(serial)
    store = open_store(store_location)
    fill_store(store, ca, T0)
    directory = Directory(store, Allowlist.of(ldap_config().attributes), entry_cache=64)
    yield Service(ldap_config(naming_contexts=("c=MO",)), directory, AnswerCache(1 << 20))
    store.close()


def run(session: Session, reply: Reply) -> list[Any]:
    """What the adapter does: run the job's steps, then write finish's PDUs."""
    if reply.job is None:
        return decode(reply.data)
    for _ in reply.job.steps():
        pass
    return decode(session.finish(reply.job))


def send(session: Session, name: str, busy: bool = False) -> list[Any]:
    data = vector(name)
    raw = session.answer_raw(data)
    if raw is not None:
        return decode(raw)
    return run(session, session.receive(codec.decode_message(data), busy))


def code(messages: list[Any]) -> int:
    return int(messages[-1].value.resultCode)


@pytest.mark.parametrize(("name", "expected"), [
    ("bind-anonymous.ber", ResultCode.SUCCESS),
    ("bind-password.ber", ResultCode.INVALID_CREDENTIALS),
    ("bind-dn-no-password.ber", ResultCode.UNWILLING_TO_PERFORM),
    ("bind-sasl.ber", ResultCode.AUTH_METHOD_NOT_SUPPORTED),
    ("bind-v2.ber", ResultCode.PROTOCOL_ERROR),
    ("delete.ber", ResultCode.UNWILLING_TO_PERFORM),
    ("extended-unknown.ber", ResultCode.PROTOCOL_ERROR),
    ("starttls.ber", ResultCode.UNAVAILABLE),  # no TLS configured
    ("search-critical-unknown-control.ber", ResultCode.UNAVAILABLE_CRITICAL_EXTENSION),
    ("search-paged-bad-cookie.ber", ResultCode.UNWILLING_TO_PERFORM),
    ("compare-mail.ber", ResultCode.COMPARE_TRUE),  # case-insensitive mail match
    ("compare-private.ber", ResultCode.UNDEFINED_ATTRIBUTE_TYPE),  # not in the schema
])
def test_result_codes(service: Service, name: str, expected: ResultCode) -> None:
    session = Session(service, 1, Log())
    msgs = send(session, name)
    assert [m.id for m in msgs] == [1]
    assert code(msgs) == expected, name


def test_whoami_is_anonymous_and_starttls_is_refused_when_tls_is_on_or_busy(
        service: Service) -> None:
    session = Session(service, 1, Log())
    (msg,) = send(session, "whoami.ber")
    assert code([msg]) == 0 and msg.value.response in (None, b"")
    service.tls = object()
    busy = session.receive(codec.decode_message(vector("search-mail.ber")))
    assert busy.job is not None  # outstanding: StartTLS must wait
    assert code(send(session, "starttls.ber")) == ResultCode.OPERATIONS_ERROR
    run(session, busy)
    reply = session.receive(codec.decode_message(vector("starttls.ber")))
    assert reply.start_tls and code(decode(reply.data)) == 0
    assert code(send(session, "starttls.ber")) == ResultCode.OPERATIONS_ERROR  # TLS already


def test_mail_search_shows_the_usable_certificate_and_is_kept_pre_encoded(
        service: Service) -> None:
    log = Log()
    session = Session(service, 7, log)
    msgs = send(session, "search-mail.ber")
    assert code(msgs) == 0 and len(msgs) == 2
    entry = msgs[0].value
    assert entry.objectName == b"cn=Subscriber 1,o=certpub tests,c=MO"
    assert [a[0] for a in entry.attributes] == [b"userCertificate;binary"]
    assert service.answers.misses == 1 and len(service.answers) == 1
    # the same bytes again: found before decoding, the same PDUs, one log pair per request
    log.lines.clear()
    assert session.answer_raw(vector("search-mail.ber")) is not None
    again = send(session, "search-mail.ber")
    assert [(m.id, m.value.toWire()) for m in again] == [(m.id, m.value.toWire()) for m in msgs]
    assert sum("SRCH" in line for line in log.lines) == 2
    assert sum("SEARCH RESULT" in line and "nentries=1" in line for line in log.lines) == 2
    # another spelling (of the base DN, of the attribute) finds it by its normalised key
    hits = service.answers.hits
    upper = send(session, "search-mail-respelled.ber")
    assert service.answers.hits == hits + 1
    assert upper[0].value.objectName == entry.objectName


def test_message_id_is_the_only_difference_between_answers(service: Service) -> None:
    session = Session(service, 1, Log())
    first = send(session, "search-mail.ber")
    top = send(session, "search-msgid-max.ber")  # no attribute list: another answer
    assert {m.id for m in top} == {2**31 - 1} and code(top) == 0
    assert [m.id for m in first] == [1, 1]


def test_base_search_at_the_subject_dn_and_types_only(service: Service) -> None:
    session = Session(service, 1, Log())
    msgs = send(session, "search-base-subject.ber")
    assert code(msgs) == 0 and len(msgs) == 2
    attrs = dict((a[0], a[1]) for a in msgs[0].value.attributes)
    assert list(attrs) == [b"userCertificate;binary"] and len(attrs[b"userCertificate;binary"]) == 1
    types = send(session, "search-types-only.ber")
    assert code(types) == 0
    assert all(values == [] for _, values in types[0].value.attributes)


def test_size_limit_paging_and_the_allowlist(service: Service) -> None:
    session = Session(service, 1, Log())
    limited = send(session, "search-size-1.ber")
    assert code(limited) == ResultCode.SIZE_LIMIT_EXCEEDED and len(limited) == 2
    page = send(session, "search-paged-2.ber")
    assert code(page) == 0 and len(page) == 3
    cookie = page[-1].controls[0][2]
    assert cookie, "a cookie to resume from"
    assert len(service.answers) == 0  # neither a truncated nor a paged answer is kept
    private = send(session, "search-private-attr.ber")  # no filter oracle: nothing matches
    assert code(private) == 0 and len(private) == 1


def test_abandon_unbind_and_busy(service: Service) -> None:
    session = Session(service, 1, Log())
    reply = session.receive(codec.decode_message(vector("search-msgid-max.ber")))
    assert reply.job is not None
    msg = codec.decode_message(vector("abandon.ber"))
    session.receive(codec.Message(msg.message_id, codec.AbandonRequest(2**31 - 1)))
    for _ in reply.job.steps():
        pass
    assert session.finish(reply.job) == b""  # RFC 4511 §4.11: an abandoned search is silent
    assert code(send(session, "search-mail.ber", busy=True)) == ResultCode.BUSY
    service.config = ldap_config(max_outstanding=1)
    held = session.receive(codec.decode_message(vector("search-size-1.ber")))
    assert held.job is not None
    assert code(send(session, "compare-mail.ber")) == ResultCode.BUSY
    assert session.receive(codec.decode_message(vector("unbind.ber"))).close
    assert held.job.abandoned


def test_every_error_maps_to_one_result_code() -> None:
    assert outcome(names.DNSyntaxError("bad"))[0] == ResultCode.INVALID_DN_SYNTAX
    assert outcome(NoSuchObject("x", "c=MO")) == (ResultCode.NO_SUCH_OBJECT, "x", "c=MO")
    assert outcome(AdminLimitExceeded("y"))[0] == ResultCode.ADMIN_LIMIT_EXCEEDED
    assert outcome(StoreError("db gone")) == (ResultCode.UNAVAILABLE, "store unavailable", "")
    assert outcome(KeyError("bug")) == (ResultCode.OTHER, "internal error", "")


def test_a_bug_in_a_job_is_logged_and_answered_other(service: Service) -> None:
    log = Log()
    session = Session(service, 1, log)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("bug")

    service.directory.base_hit = broken  # type: ignore[method-assign]
    msgs = send(session, "search-mail.ber")
    assert code(msgs) == ResultCode.OTHER and len(log.failures) == 1
    assert isinstance(log.failures[0], KeyError)


@pytest.mark.parametrize("name", ["bad-msgid-negative.ber", "bad-indefinite-length.ber",
                                  "bad-trailing-bytes.ber", "bad-deep-not-101.ber",
                                  "bad-not-ldap.ber"])
def test_malformed_vectors_are_protocol_errors(service: Service, name: str) -> None:
    data = vector(name)
    session = Session(service, 1, Log())
    assert session.answer_raw(data) is None
    with pytest.raises(ProtocolError):
        codec.frame_length(data, 1 << 20)
        codec.decode_message(data)


def test_a_non_minimal_message_id_is_decoded_not_looked_up(service: Service) -> None:
    session = Session(service, 1, Log())
    data = vector("msgid-nonminimal.ber")
    assert session.answer_raw(data) is None  # an unbind: never a kept answer
    reply = session.receive(codec.decode_message(data))
    assert reply.close  # an unbind, message 1


def padded(pdu: bytes, octets: int) -> bytes:
    """pdu (short-form length, one-octet messageID) with its messageID padded to octets."""
    assert pdu[0] == 0x30 and pdu[1] < 0x80 and pdu[2:4] == b"\x02\x01"
    body = b"\x02" + bytes((octets,)) + bytes(octets - 1) + pdu[4:5] + pdu[5:]
    return b"\x30" + bytes((len(body),)) + body


def test_a_padded_message_id_is_answered_from_the_kept_answers(service: Service) -> None:
    # 02 04 00 00 00 01: not DER, but slapd answers it at full speed; so must the fast path
    session = Session(service, 1, Log())
    minimal = send(session, "search-mail.ber")
    data = padded(vector("search-mail.ber"), 4)
    assert codec.decode_message(data).message_id == 1  # the decoder reads it too
    raw = session.answer_raw(data)
    assert raw is not None
    assert [(m.id, m.value.toWire()) for m in decode(raw)] == \
        [(m.id, m.value.toWire()) for m in minimal]
    # the answer carries the minimal encoding, as slapd's does
    at = 2 if raw[1] < 0x80 else 2 + (raw[1] & 0x7F)
    assert raw[at:at + 3] == b"\x02\x01\x01"


@pytest.mark.parametrize("mid", [b"\x02\x01\x80",  # negative
                                 b"\x02\x05\x00\x80\x00\x00\x00",  # 2**31: out of range
                                 b"\x02\x09" + bytes(8) + b"\x01"])  # past the padding bound
def test_a_message_id_out_of_range_is_never_looked_up(mid: bytes) -> None:
    op = b"\x42\x00"
    body = mid + op
    assert split_message_id(b"\x30" + bytes((len(body),)) + body) is None


def test_jobs_are_generators_that_read_nothing_until_iterated(service: Service) -> None:
    session = Session(service, 1, Log())
    calls: list[str] = []
    store = service.directory.store

    class Spy:
        def __getattr__(self, name: str) -> Any:
            calls.append(name)
            return getattr(store, name)

    service.directory.store = Spy()  # type: ignore[assignment]
    for name in ("compare-mail.ber", "search-mail.ber"):
        reply = session.receive(codec.decode_message(vector(name)))
        job: Job | None = reply.job
        assert job is not None
        steps = job.steps()
        assert calls == []  # created on the reactor thread, run wherever the seam runs it
        for _ in steps:
            pass
        assert calls
        calls.clear()
        session.finish(job)

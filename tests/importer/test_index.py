"""index.txt parsing: every field as OpenSSL writes it, and each malformed case by line number."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from importer.openssl_index import (
    IndexSyntaxError,
    IndexTracker,
    certificate_files,
    parse_index,
    parse_line,
    parse_revocation,
    parse_time,
    split_fields,
)
from store.model import RevocationReason

SUBJECT = "/C=MO/O=Test/CN=Chan Tai Man"


def line(status: str = "V", exp: str = "270301120000Z", rev: str = "", serial: str = "1F",
         fn: str = "unknown", subject: str = SUBJECT) -> str:
    return f"{status}\t{exp}\t{rev}\t{serial}\t{fn}\t{subject}"


@pytest.mark.parametrize("text, expected", [
    ("270301120000Z", datetime(2027, 3, 1, 12, tzinfo=UTC)),
    ("491231235959Z", datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ("500101000000Z", datetime(1950, 1, 1, tzinfo=UTC)),  # RFC 5280 UTCTime century rule
    ("20500630120000Z", datetime(2050, 6, 30, 12, tzinfo=UTC)),  # GeneralizedTime from 2050
])
def test_times(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["2703011200Z", "270301120000", "271301120000Z", "x"])
def test_bad_times(text: str) -> None:
    with pytest.raises(IndexSyntaxError):
        parse_time(text)


@pytest.mark.parametrize("text, reason", [
    ("260101000000Z", None),
    ("260101000000Z,unspecified", None),
    ("260101000000Z,keyCompromise", RevocationReason.KEY_COMPROMISE),
    ("260101000000Z,CACompromise", RevocationReason.CA_COMPROMISE),
    ("260101000000Z,affiliationChanged", RevocationReason.AFFILIATION_CHANGED),
    ("260101000000Z,superseded", RevocationReason.SUPERSEDED),
    ("260101000000Z,cessationOfOperation", RevocationReason.CESSATION_OF_OPERATION),
    ("260101000000Z,certificateHold", RevocationReason.CERTIFICATE_HOLD),
    ("260101000000Z,removeFromCRL", RevocationReason.REMOVE_FROM_CRL),
    ("260101000000Z,KEYCOMPROMISE", RevocationReason.KEY_COMPROMISE),  # strcasecmp in OpenSSL
    ("260101000000Z,holdInstruction,1.2.840.10040.2.2", RevocationReason.CERTIFICATE_HOLD),
    ("260101000000Z,keyTime,20251231000000Z", RevocationReason.KEY_COMPROMISE),
    ("260101000000Z,CAkeyTime,20251231000000Z", RevocationReason.CA_COMPROMISE),
])
def test_revocations(text: str, reason: RevocationReason | None) -> None:
    when, got = parse_revocation(text)
    assert when == datetime(2026, 1, 1, tzinfo=UTC)
    assert got is reason


@pytest.mark.parametrize("text", [
    "260101000000Z,stolen", "260101000000Z,holdInstruction", "260101000000Z,keyTime",
    "260101000000Z,holdInstruction,notanoid", "260101000000Z,keyTime,yesterday", "soon",
])
def test_bad_revocations(text: str) -> None:
    with pytest.raises(IndexSyntaxError):
        parse_revocation(text)


def test_escaped_tab_is_part_of_the_field() -> None:
    assert split_fields("a\tb\\\tc\td") == ["a", "b\tc", "d"]
    parsed, _ = parse_line(line(subject="/CN=tab\\\there"))
    assert parsed.subject == "/CN=tab\there"


def test_fields() -> None:
    parsed, serial = parse_line(line("R", rev="260101000000Z,superseded", serial="00FF00"))
    assert (parsed.status, parsed.serial, serial) == ("R", 0xFF00, "00FF00")
    assert parsed.reason is RevocationReason.SUPERSEDED
    assert parsed.expires == datetime(2027, 3, 1, 12, tzinfo=UTC)
    assert parsed.subject == SUBJECT and parsed.filename == "unknown"
    expired, _ = parse_line(line("E"))
    assert expired.status == "E" and expired.revoked_at is None


@pytest.mark.parametrize("text, words", [
    (line("X"), "status"),
    (line(serial="0x1F"), "hexadecimal"),
    (line(serial=""), "hexadecimal"),
    (line("R"), "without a revocation date"),
    (line("V", rev="260101000000Z"), "revocation field"),
    (line(exp="tomorrow"), "time"),
    ("V\t270301120000Z\t\t1F\tunknown", "6 tab-separated fields, found 5"),
    (line() + "\textra", "found 7"),
    ("", "found 1"),
])
def test_malformed_lines(text: str, words: str) -> None:
    with pytest.raises(IndexSyntaxError, match=words):
        parse_line(text)


def test_parse_index_reports_line_numbers_and_keeps_the_rest() -> None:
    data = "\n".join([
        "# a comment line",
        line(serial="01"),
        line("R", serial="02"),  # no revocation date
        line("R", rev="260101000000Z,keyCompromise", serial="03"),
        "garbage",
        line(serial="04") + "\r",  # CRLF line ending
    ]) + "\n" + line(serial="05")  # no newline yet: still being written
    content = parse_index(data.encode())
    assert [p.line.serial for p in content.lines] == [1, 3, 4]
    assert [p.number for p in content.lines] == [2, 4, 6]
    assert [n for n, _ in content.errors] == [3, 5]
    assert content.incomplete_tail


def test_utf8_and_undecodable_subjects() -> None:
    data = (line(subject="/CN=陳大文") + "\n").encode() + line(serial="02").encode()[:-5] + \
        b"\xff\xfe\n"
    content = parse_index(data)
    assert content.lines[0].line.subject == "/CN=陳大文"
    assert len(content.lines) == 2 and not content.errors


def test_certificate_file_candidates(tmp_path: Path) -> None:
    content = parse_index((line(serial="abc", fn="/abs/y.pem") + "\n").encode())
    first = parse_index((line(serial="0ABC", fn="certs/x.pem") + "\n").encode()).lines[0]
    names = [str(p) for p in certificate_files(tmp_path / "nc", tmp_path, first)]
    assert names == [f"{tmp_path}/nc/0ABC.pem", f"{tmp_path}/nc/certs/x.pem",
                     f"{tmp_path}/certs/x.pem"]
    names = [str(p) for p in certificate_files(tmp_path / "nc", tmp_path, content.lines[0])]
    assert names == [f"{tmp_path}/nc/abc.pem", f"{tmp_path}/nc/0ABC.pem",
                     f"{tmp_path}/nc/ABC.pem", "/abs/y.pem"]
    zero = parse_index((line(serial="0") + "\n").encode()).lines[0]
    assert [p.name for p in certificate_files(tmp_path, tmp_path, zero)] == ["0.pem", "00.pem"]


def test_tracker_hands_out_only_new_or_changed_lines(tmp_path: Path) -> None:
    index = tmp_path / "index.txt"
    tracker = IndexTracker(index)
    assert not tracker.changed()  # no file yet
    index.write_text(line(serial="01") + "\n" + line(serial="02") + "\n")
    assert tracker.changed()
    read = tracker.read()
    assert read is not None
    sig, data, sha = read
    content = parse_index(data)
    assert len(tracker.pending(content)) == 2
    tracker.mark(sig, sha, content)
    assert not tracker.changed()
    # `openssl ca -revoke` rewrites line 2 and appends line 3
    index.write_text(line(serial="01") + "\n" + line("R", rev="260101000000Z", serial="02")
                     + "\n" + line(serial="03") + "\n")
    assert tracker.changed()
    read = tracker.read()
    assert read is not None
    pending = tracker.pending(parse_index(read[1]))
    assert [(p.line.status, p.line.serial) for p in pending] == [("R", 2), ("V", 3)]

"""The search form's parameters: serial spellings, fingerprints, guesses, limits."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from server.web.query import (
    MAX_PAGE, MAX_QUERY, QueryError, parse_search, parse_serial, parse_sha256,
)

FP = "bf302051bd06e2f0f596f75351482e97f9e369f462f2239345a1462db8f32fc2"


def q(**params: str) -> bytes:
    return urlencode(params).encode()


@pytest.mark.parametrize("text", ["80", "0x80", "0X80", "00:80", "0080", "0x0080", "00 80",
                                  " 80 ", "00-80"])
def test_serial_in_any_spelling(text: str) -> None:
    assert parse_serial(text) == 0x80


@pytest.mark.parametrize("text", ["", "0x", "xyz", "12g4", "+80", "8" * 65])
def test_not_a_serial(text: str) -> None:
    assert parse_serial(text) is None


@pytest.mark.parametrize("text", [FP, FP.upper(), ":".join(FP[i:i + 2] for i in range(0, 64, 2)),
                                  "sha256:" + FP])
def test_fingerprint_spellings(text: str) -> None:
    assert parse_sha256(text) == bytes.fromhex(FP)


def test_guesses_what_was_typed() -> None:
    mail = parse_search(q(q="Chan.TaiMan@CEM.example.mo"))
    assert mail.mail == "chan.taiman@cem.example.mo" and mail.name is None and mail.serial is None
    fp = parse_search(q(q=FP.upper()))
    assert fp.sha256 == bytes.fromhex(FP) and fp.name is None
    serial = parse_search(q(q="0x00FF00"))
    assert serial.serial == 0xFF00 and serial.name is None
    colons = parse_search(q(q="ff:00"))
    assert colons.serial == 0xFF00 and colons.name is None
    both = parse_search(q(q="Abe"))  # hex digits and a name: both are tried
    assert both.serial == 0xABE and both.name == "abe"
    name = parse_search(q(q="  陳大文 "))
    assert name.name == "陳大文" and name.serial is None and name.text == "陳大文"
    accented = parse_search(q(q="JOÃO"))
    assert accented.name == "joão"


def test_explicit_kinds() -> None:
    assert parse_search(q(q="abc", type="name")).serial is None
    assert parse_search(q(q="abc", type="serial")).name is None
    with pytest.raises(QueryError) as err:
        parse_search(q(q="zz", type="serial"))
    assert err.value.key == "error_bad_serial" and err.value.args_ == {"text": "zz"}
    with pytest.raises(QueryError) as err:
        parse_search(q(q="abc", type="sha256"))
    assert err.value.key == "error_bad_sha256"
    with pytest.raises(QueryError) as err:
        parse_search(q(q="abc", type="userPassword"))
    assert err.value.key == "error_bad_type"


@pytest.mark.parametrize("query,key", [
    (q(q="a" * (MAX_QUERY + 1)), "error_query_too_long"),
    (b"q=" + b"a" * 3000, "error_query_too_long"),
    (b"q=%ff%fe", "error_bad_query"),
    (q(q="a\x00b"), "error_bad_query"),
    (q(q="a", page="0"), "error_bad_page"),
    (q(q="a", page=str(MAX_PAGE + 1)), "error_bad_page"),
    (q(q="a", page="-1"), "error_bad_page"),
    (q(q="a", page="1e3"), "error_bad_page"),
])
def test_refusals_name_what_was_wrong(query: bytes, key: str) -> None:
    with pytest.raises(QueryError) as err:
        parse_search(query)
    assert err.value.key == key


def test_limits_are_accepted_at_the_edge() -> None:
    assert parse_search(q(q="a" * MAX_QUERY, page=str(MAX_PAGE))).page == MAX_PAGE
    assert parse_search(None).empty and parse_search(b"").page == 1

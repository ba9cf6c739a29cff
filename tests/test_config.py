"""Configuration: the example loads; every mistake names its key path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.config import load_config, parse_config
from server.configtools import ConfigError

EXAMPLE = Path(__file__).parent.parent / "conf" / "certpub.example.toml"


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def test_example_loads_with_every_section() -> None:
    config = parse_config(example(), EXAMPLE, check_files=False)
    assert [c.name for c in config.cas] == ["root", "issuing-ca"]
    assert config.cas[1].ocsp is not None and config.cas[1].ocsp.validity == 86400
    assert config.import_.openssl[0].ca == "issuing-ca"
    assert config.ldap.size_limit == 500 and config.http.max_certids == 100
    assert config.tls is None and config.log.format == "logfmt"
    assert config.server.workers == 0
    assert config.ops.listen == ("tcp:9100:interface=127.0.0.1",)
    assert config.ops.public_networks == ()


def test_ops_defaults_to_no_listener_and_no_public_access() -> None:
    data = example()
    del data["ops"]
    ops = parse_config(data, check_files=False).ops
    assert ops.listen == () and ops.public_networks == ()
    assert not ops.public_allows("127.0.0.1")


def test_ops_public_networks_match_v4_v6_and_mapped_addresses() -> None:
    data = example()
    data["ops"]["public_networks"] = ["10.0.0.0/8", "2001:db8::/32"]
    ops = parse_config(data, check_files=False).ops
    assert ops.public_allows("10.1.2.3") and ops.public_allows("::ffff:10.0.0.1")
    assert ops.public_allows("2001:db8::1")
    assert not ops.public_allows("192.0.2.1") and not ops.public_allows("-")


def test_example_documents_every_key() -> None:
    # Every key a parser reads must appear in the example (so the example stays complete).
    text = EXAMPLE.read_text()
    for key in ("path", "spool", "processed", "poll_interval", "batch_size", "index", "certs_dir",
                "signer_certificate", "signer_key", "responder_id", "rsa_padding", "validity",
                "unknown_serials", "archive_cutoff", "listen", "naming_contexts", "attributes",
                "size_limit", "time_limit", "max_request_bytes", "ocsp_paths", "max_certids",
                "certificate", "key", "format", "file", "level", "max_connections",
                "max_connections_per_address", "idle_timeout", "max_filter_depth",
                "max_filter_items", "scan_limit", "max_outstanding", "cache_entries",
                "public_networks"):
        assert f"\n{key} =" in text or f"#{key} =" in text, key


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (lambda d: d["store"].update(pathh="x"), "store.pathh", "unknown key"),
        (lambda d: d["import"].update(processed="keep"), "import.processed", "one of move, delete"),
        (lambda d: d["import"].update(poll_interval="soon"), "import.poll_interval", "duration"),
        (lambda d: d["import"].update(batch_size=0), "import.batch_size", "at least 1"),
        (lambda d: d["import"]["openssl"][0].update(ca="nope"), "import.openssl[0].ca", "no configured CA"),
        (lambda d: d["ca"][1]["ocsp"].update(validity="1h"), "ca[1].ocsp.validity", "at least 28800"),
        (lambda d: d["ca"][1]["ocsp"].update(validity="11d"), "ca[1].ocsp.validity", "at most"),
        (lambda d: d["ca"][1]["ocsp"].pop("signer_key"), "ca[1].ocsp.signer_key", "required"),
        (lambda d: d["ca"][1].update(name="root"), "ca[1].name", "duplicate"),
        (lambda d: d["ldap"].update(size_limit="many"), "ldap.size_limit", "an integer"),
        (lambda d: d["ldap"].update(listen=[389]), "ldap.listen[0]", "a string"),
        (lambda d: d["http"].update(ocsp_paths=["ocsp"]), "http.ocsp_paths[0]", "starting with '/'"),
        (lambda d: d["log"].update(format="xml"), "log.format", "logfmt, json"),
        (lambda d: d["server"].update(workers=-1), "server.workers", "at least 0"),
        (lambda d: d["ops"].update(public_networks=["10.0.0.1/8"]), "ops.public_networks[0]",
         "host bits set"),
        (lambda d: d["ops"].update(public_networks=["anywhere"]), "ops.public_networks[0]",
         "expected a network"),
        (lambda d: d["ops"].update(listen="tcp:9100", port=9100), "ops.port", "unknown key"),
        (lambda d: d.pop("ca"), "ca", "at least one"),
        (lambda d: d.update(extra={}), "extra", "unknown key"),
        (lambda d: d["ca"][0].update(certificate=True), "ca[0].certificate", "got a boolean"),
    ],
)
def test_errors_name_the_key(mutate: Any, key: str, words: str) -> None:
    data = example()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=False)
    assert info.value.key == key
    assert words in str(info.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\[0\].certificate: file .*root.pem does not exist"):
        parse_config(example())


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[store\npath = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("section", "typo", "message"),
    [
        ("import", "poll_intervall", "import.poll_intervall: unknown key (did you mean poll_interval?)"),
        ("ldap", "size_limt", "ldap.size_limt: unknown key (did you mean size_limit?)"),
        ("store", "Path", "store.Path: unknown key (did you mean path?)"),
        (None, "tsl", "tsl: unknown key (did you mean tls?)"),  # an absent section is known too
        ("http", "zzzz", "http.zzzz: unknown key"),  # nothing close: no guess
    ],
)
def test_unknown_key_suggests_the_closest_known_key(section: str | None, typo: str,
                                                    message: str) -> None:
    data = example()
    table = data if section is None else data[section]
    table.pop(message.partition("did you mean ")[2].rstrip("?)"), None)  # misspelt, not added
    table[typo] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=False)
    assert str(info.value) == message


def test_unknown_key_suggestion_skips_keys_already_given() -> None:
    data = example()
    data["import"]["poll_intervall"] = 1  # poll_interval is in the example already
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=False)
    assert str(info.value) == "import.poll_intervall: unknown key"

"""PKCS#11 URIs, the [pkcs11] table, mechanism choice, and every key type signing in SoftHSM2."""

from __future__ import annotations

import os
import re
import threading
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID
from pkcs11 import Mechanism

from server.config import parse_config
from server.configtools import ConfigError
from server.demo.hsm import create_token
from server.ocsp.mechanisms import choose_plan, verify
from server.ocsp.p11uri import parse_pkcs11_uri
from tests.ocsp.helpers import T0, issue, name, new_key, write_cert, write_key
from tests.ocsp.test_pkcs11 import PIN, require_softhsm

EXAMPLE = Path(__file__).parent.parent.parent / "conf" / "certpub.example.toml"

# --- URIs --------------------------------------------------------------------------------------


def test_uri_attributes_are_decoded() -> None:
    u = parse_pkcs11_uri("pkcs11:token=My%20HSM;object=qca-ocsp;id=%01%ff;serial=42;slot-id=7;"
                         "type=private;manufacturer=SoftHSM%20project;model=SoftHSM%20v2", "k")
    assert (u.token, u.object, u.id, u.serial, u.slot_id) == ("My HSM", "qca-ocsp", b"\x01\xff",
                                                             "42", 7)
    assert u.manufacturer == "SoftHSM project" and u.model == "SoftHSM v2"
    assert str(u).startswith("pkcs11:token=My%20HSM")


@pytest.mark.parametrize(("uri", "words"), [
    ("pkcs11:token=a", "names no key"),
    ("pkcs11:token=a;object=b?pin-value=1234", "must not carry the PIN"),
    ("pkcs11:object=b;pin-value=1234", "must not carry the PIN"),
    ("pkcs11:object=b?module-path=/x.so", "query attribute 'module-path' is not supported"),
    ("pkcs11:object=b;type=cert", "type must be private"),
    ("pkcs11:object=b;colour=red", "attribute 'colour' is not supported"),
    ("pkcs11:object=b;object=c", "appears twice"),
    ("pkcs11:object=%zz", "bad percent-escape"),
    ("pkcs11:object=b;slot-id=x", "slot-id must be a decimal number"),
    ("pkcs11:object", "expected attribute=value"),
])
def test_bad_uris_are_named(uri: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        parse_pkcs11_uri(uri, "ca[1].ocsp.signer_key")
    assert str(err.value).startswith("ca[1].ocsp.signer_key: ")
    assert "1234" not in str(err.value)


# --- configuration -----------------------------------------------------------------------------


def _example(pkcs11: bool = True, uri: str = "pkcs11:token=certpub;object=issuing-ca-ocsp",
             **table: Any) -> dict[str, Any]:
    text = EXAMPLE.read_text()
    if pkcs11:  # the commented-out [pkcs11] table, as documented
        for line in ("#[pkcs11]", '#module = "', '#pin_file = "', '#retry_interval = "'):
            text = text.replace(line, line[1:])
    data = tomllib.loads(text)
    data["ca"][1]["ocsp"]["signer_key"] = uri
    if pkcs11:
        data["pkcs11"].update(table)
    return data


def test_example_pkcs11_table_loads() -> None:
    config = parse_config(_example(), EXAMPLE, check_files=False)
    assert config.pkcs11 is not None
    assert str(config.pkcs11.module) == "/usr/lib/softhsm/libsofthsm2.so"
    assert config.pkcs11.retry_interval == 1.0 and config.pkcs11.pin_env is None
    key = config.cas[1].ocsp.signer_key  # type: ignore[union-attr]
    assert str(key) == "pkcs11:token=certpub;object=issuing-ca-ocsp"
    text = EXAMPLE.read_text()
    for k in ("module", "pin_file", "pin_env", "retry_interval"):
        assert f"#{k} =" in text, k


@pytest.mark.parametrize(("data", "key", "words"), [
    (_example(pkcs11=False), "ca[1].ocsp.signer_key", "needs the [pkcs11] table"),
    (_example(pin_env="PIN"), "pkcs11.pin_file", "either pin_file or pin_env"),
    (_example(sessions=4), "pkcs11.sessions", "unknown key"),
    (_example(retry_interval="forever"), "pkcs11.retry_interval", "duration"),
    (_example(uri="pkcs11:token=x"), "ca[1].ocsp.signer_key", "names no key"),
])
def test_pkcs11_config_errors_name_the_key(data: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        parse_config(data, EXAMPLE, check_files=False)
    assert err.value.key == key


def test_missing_module_and_open_pin_file_are_refused(tmp_path: Path) -> None:
    data = _example()
    data["pkcs11"]["module"] = str(tmp_path / "nope.so")
    with pytest.raises(ConfigError, match="nope.so does not exist") as err:
        _parse_files_checked(data, tmp_path)
    assert err.value.key == "pkcs11.module"
    data["pkcs11"]["module"] = str(write_key(tmp_path / "lib.so", new_key("p256")))
    pin = tmp_path / "pin"
    pin.write_text(PIN)
    pin.chmod(0o640)
    data["pkcs11"]["pin_file"] = str(pin)
    with pytest.raises(ConfigError, match="mode 0640") as err:
        _parse_files_checked(data, tmp_path)
    assert err.value.key == "pkcs11.pin_file" and PIN not in str(err.value)


def _parse_files_checked(data: dict[str, Any], tmp: Path) -> Any:
    """parse_config with file checks, the example's other files made to exist."""
    for ca in data["ca"]:
        ca["certificate"] = str(write_key(tmp / f"{ca['name']}.pem", new_key("p256"), 0o644))
        if "ocsp" in ca:
            ca["ocsp"]["signer_certificate"] = ca["certificate"]
    data["import"]["openssl"] = []
    return parse_config(data, EXAMPLE, check_files=True)


# --- mechanisms --------------------------------------------------------------------------------

ALL = {Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS, Mechanism.SHA256_RSA_PKCS_PSS,
       Mechanism.RSA_PKCS_PSS, Mechanism.ECDSA_SHA256, Mechanism.ECDSA_SHA384, Mechanism.ECDSA,
       Mechanism.EDDSA}


@pytest.mark.parametrize(("kind", "padding", "available", "mechanism", "prehash"), [
    ("rsa", "pkcs1v15", ALL, Mechanism.SHA256_RSA_PKCS, None),
    ("rsa", "pkcs1v15", {Mechanism.RSA_PKCS}, Mechanism.RSA_PKCS, "sha256"),
    ("rsa", "pss", ALL, Mechanism.SHA256_RSA_PKCS_PSS, None),
    ("rsa", "pss", {Mechanism.RSA_PKCS_PSS}, Mechanism.RSA_PKCS_PSS, "sha256"),
    ("p256", "pkcs1v15", ALL, Mechanism.ECDSA_SHA256, None),
    ("p256", "pkcs1v15", {Mechanism.ECDSA}, Mechanism.ECDSA, "sha256"),
    ("p384", "pkcs1v15", ALL, Mechanism.ECDSA_SHA384, None),
    ("p384", "pkcs1v15", {Mechanism.ECDSA}, Mechanism.ECDSA, "sha384"),
    ("ed25519", "pkcs1v15", ALL, Mechanism.EDDSA, None),
])
def test_the_token_hashes_when_it_can(kind: str, padding: str, available: set[Any],
                                      mechanism: Mechanism, prehash: str | None) -> None:
    plan = choose_plan(new_key(kind).public_key(), padding, available)
    assert plan.mechanism == mechanism and plan.prehash == prehash


def test_no_mechanism_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CKM_ECDSA_SHA256 or CKM_ECDSA"):
        choose_plan(new_key("p256").public_key(), "pkcs1v15", {Mechanism.RSA_PKCS})
    with pytest.raises(ValueError, match="at least 2048"):
        choose_plan(rsa.generate_private_key(65537, 1024).public_key(), "pkcs1v15", ALL)


@pytest.mark.parametrize("kind", ["p256", "p384"])
def test_raw_r_s_becomes_der(kind: str) -> None:
    """What CKM_ECDSA returns (r||s over a digest) becomes the DER that verifies."""
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    key = new_key(kind)
    plan = choose_plan(key.public_key(), "pkcs1v15", {Mechanism.ECDSA})
    data = b"tbsResponseData"
    digest = plan.payload(data)
    hash_alg = hashes.SHA256() if kind == "p256" else hashes.SHA384()
    der = key.sign(digest, ec.ECDSA(Prehashed(hash_alg)))
    r, s = decode_dss_signature(der)
    size = (key.curve.key_size + 7) // 8
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert verify(key.public_key(), plan, data, plan.encode(raw))
    assert not verify(key.public_key(), plan, data + b"x", plan.encode(raw))


# --- every key type through a real token -------------------------------------------------------


@pytest.mark.parametrize(("kind", "padding", "algorithm"), [
    ("rsa", "pkcs1v15", "sha256_rsa"),
    ("rsa", "pss", "rsassa_pss_sha256"),
    ("p256", "pkcs1v15", "sha256_ecdsa"),
    ("p384", "pkcs1v15", "sha384_ecdsa"),
    ("ed25519", "pkcs1v15", "ed25519"),
])
@pytest.mark.parametrize("delegated", [True, False], ids=["delegated", "ca-key"])
def test_every_key_type_signs_in_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           kind: str, padding: str, algorithm: str,
                                           delegated: bool) -> None:
    require_softhsm()
    token = create_token(tmp_path / "hsm", pin=PIN)
    monkeypatch.setenv("SOFTHSM2_CONF", str(token.conf))
    ca_key = new_key(kind if not delegated else "p256")
    ca_cert = issue(name("Token CA"), ca_key.public_key(), None, ca_key, ca=True,
                    not_before=datetime.now(UTC) - (T0 - T0.replace(year=2029)),
                    not_after=datetime.now(UTC).replace(year=datetime.now(UTC).year + 2))
    write_cert(tmp_path / "ca.pem", ca_cert)
    table = ""
    if delegated:
        signer_key = new_key(kind)
        cert = issue(name("Token OCSP signer"), signer_key.public_key(), (ca_cert, ca_key),
                     not_before=ca_cert.not_valid_before_utc,
                     not_after=ca_cert.not_valid_after_utc, eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
        write_cert(tmp_path / "signer.pem", cert)
        table = f'signer_certificate = "{tmp_path / "signer.pem"}"\n'
    else:
        signer_key = ca_key
    token.import_key(write_key(tmp_path / "k.pem", signer_key), "signer", b"\x07")
    (tmp_path / "k.pem").unlink()
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[store]\npath = "{tmp_path / "s.sqlite3"}"\n[[ca]]\nname = "t"\n'
        f'certificate = "{tmp_path / "ca.pem"}"\n[ca.ocsp]\n{table}'
        f'signer_key = "pkcs11:token=certpub;id=%07"\nrsa_padding = "{padding}"\n'
        f'[pkcs11]\nmodule = "{token.module}"\npin_file = "{token.pin_file}"\n')
    from server.config import load_config
    from server.ocsp.signer import load_signers

    signer = load_signers(load_config(conf), datetime.now(UTC))["t"]
    assert signer.algorithm_name == algorithm and signer.delegated == delegated
    data = os.urandom(300)
    sig = signer.sign(data)
    public = signer_key.public_key()
    plan = signer._sign.__self__.plan  # type: ignore[attr-defined]
    assert verify(public, plan, data, sig)
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(sig, data)
    # Several threads at once: each gets a session of its own, every signature verifies.
    results: list[bool] = []

    def work() -> None:
        for i in range(20):
            d = data + bytes([i])
            results.append(verify(public, plan, d, signer.sign(d)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 80

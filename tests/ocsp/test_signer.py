"""Signers: algorithms and identifiers, and every check that refuses a bad signer."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from asn1crypto import algos
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509 import SubjectKeyIdentifier

from server.configtools import ConfigError
from server.ocsp.signer import SignerError, check_signers, expiry_warning, load_signer
from tests.ocsp.helpers import (
    DAY,
    T0,
    FakeCa,
    config_for,
    make_ca,
    new_key,
    signer_config,
    write_key,
)


def ca_entry(ca, **kw):  # type: ignore[no-untyped-def]
    return FakeCa(ca.name, ca.cert_path, signer_config(ca, **kw))


@pytest.mark.parametrize(("kind", "padding_name", "algorithm"), [
    ("rsa", "pkcs1v15", "sha256_rsa"),
    ("rsa", "pss", "rsassa_pss"),
    ("p256", "pkcs1v15", "sha256_ecdsa"),
    ("p384", "pkcs1v15", "sha384_ecdsa"),
    ("ed25519", "pkcs1v15", "ed25519"),
])
def test_algorithms_sign_and_name_themselves(tmp_path: Path, kind: str, padding_name: str,
                                             algorithm: str) -> None:
    ca = make_ca(tmp_path, "alg", "p256", signer_kind=kind)
    signer = load_signer(ca_entry(ca, rsa_padding=padding_name), T0)  # type: ignore[arg-type]
    alg = algos.SignedDigestAlgorithm.load(signer.algorithm_der)
    assert alg["algorithm"].native == algorithm
    if algorithm == "sha256_rsa":
        assert signer.algorithm_der.endswith(b"\x05\x00")  # NULL parameters (RFC 4055)
    if algorithm.endswith("ecdsa") or algorithm == "ed25519":
        assert alg["parameters"].native is None
    sig = signer.sign(b"data")
    pub = ca.signer_cert.public_key()
    if kind == "rsa" and padding_name == "pss":
        pub.verify(sig, b"data", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    elif kind == "rsa":
        pub.verify(sig, b"data", padding.PKCS1v15(), hashes.SHA256())
    elif kind == "p256":
        pub.verify(sig, b"data", ec.ECDSA(hashes.SHA256()))
    elif kind == "p384":
        pub.verify(sig, b"data", ec.ECDSA(hashes.SHA384()))
    else:
        pub.verify(sig, b"data")
    assert signer.delegated and signer.certs[0] != signer.certs[1]


def test_responder_id_by_key_and_by_name(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "rid")
    by_key = load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]
    ski = SubjectKeyIdentifier.from_public_key(ca.signer_cert.public_key()).digest
    assert by_key.responder_id.by_key == ski
    by_name = load_signer(ca_entry(ca, responder_id="by_name"), T0)  # type: ignore[arg-type]
    assert by_name.responder_id.by_name == ca.signer_cert.subject.public_bytes()


def test_ca_signs_itself(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "self")
    write_key(tmp_path / "ca.key", ca.key)
    signer = load_signer(FakeCa(ca.name, ca.cert_path, replace(  # type: ignore[arg-type]
        signer_config(ca), signer_certificate=None, signer_key=tmp_path / "ca.key")), T0)
    assert not signer.delegated and signer.certs == ()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    ca = make_ca(tmp_path, "mode")
    os.chmod(ca.signer_key_path, mode)
    with pytest.raises(SignerError) as info:
        load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]
    text = str(info.value)
    assert str(ca.signer_key_path) in text and f"{mode:04o}" in text
    assert "ocsp.signer_key" in text
    assert isinstance(info.value, ConfigError)


def test_key_not_matching_certificate(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "mismatch")
    write_key(ca.signer_key_path, new_key("p256"))
    with pytest.raises(SignerError, match="does not match"):
        load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]


def test_signer_from_another_ca(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "a", "a")
    other = make_ca(tmp_path / "b", "b")
    cfg = replace(signer_config(ca), signer_certificate=other.signer_cert_path,
                  signer_key=other.signer_key_path)
    with pytest.raises(SignerError, match="not issued by CA a"):
        load_signer(FakeCa("a", ca.cert_path, cfg), T0)  # type: ignore[arg-type]


def test_signer_without_ocsp_signing_eku(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "noeku", signer_eku=False)
    with pytest.raises(SignerError, match="id-kp-OCSPSigning"):
        load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]


def test_expired_and_not_yet_valid_signer(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "old")
    with pytest.raises(SignerError, match="expired on"):
        load_signer(ca_entry(ca), T0 + 400 * DAY)  # type: ignore[arg-type]
    with pytest.raises(SignerError, match="not valid before"):
        load_signer(ca_entry(ca), T0 - 20 * DAY)  # type: ignore[arg-type]


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "garbage")
    ca.signer_key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
    os.chmod(ca.signer_key_path, 0o600)
    with pytest.raises(SignerError, match="is not a PEM or DER private key") as info:
        load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]
    assert "not a key" not in str(info.value)  # never echo key material


def test_expiry_warning_within_30_days(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "soon", signer_not_after=T0 + 10 * DAY)
    signer = load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]
    warning = expiry_warning(signer, T0)
    assert warning is not None and "soon" in warning and "10.0 days" in warning
    assert expiry_warning(signer, T0 - timedelta(days=25)) is None


def test_check_signers_lines(tmp_path: Path) -> None:
    a = make_ca(tmp_path / "a", "a")
    b = make_ca(tmp_path / "b", "b")
    lines = check_signers(config_for(a, unserved=(b,)), T0)  # type: ignore[arg-type]
    assert lines[0].startswith("OCSP signer of a: delegated, sha256_ecdsa")
    assert any("CA b: no [ca.ocsp]" in line for line in lines)


def test_signer_repr_hides_the_key(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "repr")
    signer = load_signer(ca_entry(ca), T0)  # type: ignore[arg-type]
    assert "_sign" not in repr(signer) and "PrivateKey" not in repr(signer)

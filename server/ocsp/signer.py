"""OCSP signers: one private key and its certificate per CA, checked before the server starts.

Strategy: ``load_signer`` reads the key file (refusing one that group or others may read),
the signer certificate and the CA certificate, and checks everything a relying party will
check (issued by the CA, id-kp-OCSPSigning, valid now, key matches certificate), so a bad
signer stops the start with one line naming the configuration key instead of producing
responses every client rejects. A ``Signer`` hides its key: its repr, its errors and the log
never carry key material. ``cryptography`` signs; asn1crypto only spells the algorithm.

A ``signer_key`` may also be a PKCS#11 URI (RFC 7512): the key then stays in its token and
``server.ocsp.hsm`` signs through it, after the same checks (see there).

RFC 6960 §4.2.2.2 (delegated responders), RFC 5019 §2.2.2 / RFC 9919 (algorithms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asn1crypto import algos, core
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.configtools import SignerError, check_key_file  # their home; imported from here too
from server.ocsp.codec import ResponderId, key_hash
from server.ocsp.p11uri import Pkcs11Uri

if TYPE_CHECKING:
    from server.config import CaConfig, Config
    from server.ocsp.config import Pkcs11Config

EXPIRY_WARNING = timedelta(days=30)
MIN_RSA_BITS = 2048


SignFunction = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Signer:
    """What signs one CA's responses: the key (hidden), the certificate, the identifiers."""

    ca_name: str
    ca_certificate_der: bytes
    certificate_der: bytes  # the signer's certificate (the CA's own when not delegated)
    not_after: datetime
    algorithm_der: bytes  # DER AlgorithmIdentifier of the signature
    algorithm_name: str
    responder_id: ResponderId
    certs: tuple[bytes, ...]  # embedded in BasicOCSPResponse.certs
    delegated: bool
    _sign: SignFunction = field(repr=False, compare=False)

    def sign(self, data: bytes) -> bytes:
        """The signature of data (a DER tbsResponseData)."""
        return self._sign(data)

    def expires_within(self, now: datetime, window: timedelta = EXPIRY_WARNING) -> bool:
        return self.not_after - now <= window


def _rsa_signer(key: rsa.RSAPrivateKey, pss: bool) -> tuple[SignFunction, bytes, str]:
    if pss:
        pad: padding.AsymmetricPadding = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        params = algos.RSASSAPSSParams({
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            "salt_length": 32,
        })
        alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params})
        name = "rsassa_pss_sha256"
    else:
        pad = padding.PKCS1v15()
        alg = algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa", "parameters": core.Null()})
        name = "sha256_rsa"

    def sign(data: bytes) -> bytes:
        return key.sign(data, pad, hashes.SHA256())

    return sign, alg.dump(), name


_EC_HASHES: dict[str, tuple[type[hashes.HashAlgorithm], str]] = {
    "secp256r1": (hashes.SHA256, "sha256_ecdsa"),
    "secp384r1": (hashes.SHA384, "sha384_ecdsa"),
    "secp521r1": (hashes.SHA512, "sha512_ecdsa"),
}


def signing_function(key: Any, rsa_padding: str = "pkcs1v15") -> tuple[SignFunction, bytes, str]:
    """(sign, AlgorithmIdentifier DER, name) for a private key; ValueError if unsupported.
    A key held elsewhere (``server.ocsp.hsm.TokenKey``) brings its own ``signing_function``."""
    external = getattr(key, "signing_function", None)
    if callable(external):
        return external(rsa_padding)  # type: ignore[no-any-return]
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} required")
        return _rsa_signer(key, rsa_padding == "pss")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        found = _EC_HASHES.get(key.curve.name)
        if found is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256, P-384, P-521)")
        hash_type, name = found
        algorithm = ec.ECDSA(hash_type())
        alg = algos.SignedDigestAlgorithm({"algorithm": name})

        def sign_ec(data: bytes) -> bytes:
            return key.sign(data, algorithm)

        return sign_ec, alg.dump(), name
    if isinstance(key, ed25519.Ed25519PrivateKey):
        def sign_ed(data: bytes) -> bytes:
            return key.sign(data)

        return sign_ed, algos.SignedDigestAlgorithm({"algorithm": "ed25519"}).dump(), "ed25519"
    raise ValueError(f"{type(key).__name__} keys are not supported (RSA, ECDSA, Ed25519)")


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def make_signer(
    ca_name: str,
    ca_certificate: x509.Certificate,
    key: Any,
    certificate: x509.Certificate | None = None,
    *,
    responder_id: str = "by_key",
    rsa_padding: str = "pkcs1v15",
) -> Signer:
    """A Signer from objects already loaded; ``certificate`` None: the CA signs itself."""
    cert = certificate or ca_certificate
    sign, alg_der, alg_name = signing_function(key, rsa_padding)
    rid = (ResponderId(by_key=key_hash(_spki(cert))) if responder_id == "by_key"
           else ResponderId(by_name=cert.subject.public_bytes()))
    ca_der = ca_certificate.public_bytes(serialization.Encoding.DER)
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    delegated = cert_der != ca_der
    # The delegated signer's certificate is what a client needs to verify the signature
    # (RFC 6960 §4.2.2.2); the CA's own certificate beside it lets a client that trusts only
    # the root (`openssl ocsp -CAfile root.pem`) build the signer's chain.
    certs = (cert_der, ca_der) if delegated else ()
    return Signer(
        ca_name=ca_name, ca_certificate_der=ca_der, certificate_der=cert_der,
        not_after=cert.not_valid_after_utc, algorithm_der=alg_der, algorithm_name=alg_name,
        responder_id=rid, certs=certs, delegated=delegated, _sign=sign,
    )


# --- loading and checking ------------------------------------------------------------------


def _read_certificate(path: Path, key: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignerError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise SignerError(key, f"{path} is not a PEM or DER certificate") from None


def _read_key(path: Path, key: str) -> Any:
    check_key_file(path, key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignerError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise SignerError(key, f"{path} is encrypted; certpub needs an unencrypted key"
                          " readable by the service user only") from None
    except (ValueError, UnsupportedAlgorithm):
        # Never echo the library's message: some quote the input.
        raise SignerError(key, f"{path} is not a PEM or DER private key") from None


def _has_ocsp_signing(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in eku


def _date(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def load_signer(ca: CaConfig, now: datetime, *, prefix: str = "",
                pkcs11: Pkcs11Config | None = None) -> Signer:
    """Load and check the signer of one CA (``ca.ocsp`` must be set); raise SignerError.
    A ``pkcs11:`` signer key is opened in its token with ``pkcs11`` (``[pkcs11]``)."""
    cfg = ca.ocsp
    if cfg is None:
        raise ValueError(f"CA {ca.name} has no [ca.ocsp] table")
    base = prefix or f"ca[{ca.name}]"
    key_key, cert_key = f"{base}.ocsp.signer_key", f"{base}.ocsp.signer_certificate"
    ca_cert = _read_certificate(ca.certificate, f"{base}.certificate")
    if cfg.signer_certificate is None:
        cert, where = ca_cert, f"{base}.certificate"
    else:
        cert, where = _read_certificate(cfg.signer_certificate, cert_key), cert_key
    private_key: Any
    if isinstance(cfg.signer_key, Pkcs11Uri):
        if pkcs11 is None:
            raise SignerError(key_key, "a pkcs11: key needs the [pkcs11] table")
        from server.ocsp.hsm import open_token_key

        # Checks type, size, public key and a test signature against cert (SignerError-like
        # TokenKeyError naming key_key and the URI).
        private_key = open_token_key(
            pkcs11, cfg.signer_key, cert.public_key(), ca_name=ca.name,
            rsa_padding=cfg.rsa_padding, key=key_key,
            cert_path=str(cfg.signer_certificate or ca.certificate))
    else:
        private_key = _read_key(cfg.signer_key, key_key)
    if not isinstance(cfg.signer_key, Pkcs11Uri) and _spki(cert) != private_key.public_key(
            ).public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo):
        raise SignerError(key_key, f"the key in {cfg.signer_key} does not match the certificate"
                          f" {cfg.signer_certificate or ca.certificate}")
    delegated = cert != ca_cert
    if delegated:
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise SignerError(where, f"{cfg.signer_certificate} is not issued by CA {ca.name}"
                              f" ({ca.certificate})") from None
        if not _has_ocsp_signing(cert):
            raise SignerError(where, f"{cfg.signer_certificate} lacks the extended key usage"
                              " id-kp-OCSPSigning (RFC 6960 §4.2.2.2)")
    if now < cert.not_valid_before_utc:
        raise SignerError(where, f"signer certificate is not valid before"
                          f" {_date(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        raise SignerError(where, f"signer certificate expired on {_date(cert.not_valid_after_utc)}")
    try:
        return make_signer(ca.name, ca_cert, private_key, cert if delegated else None,
                           responder_id=cfg.responder_id, rsa_padding=cfg.rsa_padding)
    except ValueError as exc:
        raise SignerError(key_key, f"{cfg.signer_key}: {exc}") from None


def load_signers(config: Config, now: datetime) -> dict[str, Signer]:
    """Every configured CA's signer, by CA name; the first bad one raises SignerError."""
    out: dict[str, Signer] = {}
    pkcs11 = getattr(config, "pkcs11", None)
    if pkcs11 is not None and any(ca.ocsp is not None and isinstance(ca.ocsp.signer_key, Pkcs11Uri)
                                  for ca in config.cas):
        from server.ocsp.hsm import reopen_modules

        reopen_modules(pkcs11)  # SIGHUP re-opens the token (a no-op before the first load)
    for i, ca in enumerate(config.cas):
        if ca.ocsp is not None:
            out[ca.name] = load_signer(ca, now, prefix=f"ca[{i}]", pkcs11=pkcs11)
    return out


def expiry_warning(signer: Signer, now: datetime) -> str | None:
    """The warning to log when a signer expires within 30 days, else None."""
    if not signer.expires_within(now):
        return None
    days = (signer.not_after - now).total_seconds() / 86400
    return (f"OCSP signer of CA {signer.ca_name} expires on {_date(signer.not_after)}"
            f" ({days:.1f} days): renew it")


def check_signers(config: Config, now: datetime) -> list[str]:
    """Lines for ``certpub check-config``: one per signer, warnings included."""
    lines = []
    for name, signer in load_signers(config, now).items():
        kind = "delegated" if signer.delegated else "CA key"
        ca_cfg = next((c for c in config.cas if c.name == name), None)
        where = ""
        if ca_cfg is not None and ca_cfg.ocsp is not None and isinstance(ca_cfg.ocsp.signer_key,
                                                                          Pkcs11Uri):
            where = f" in token {ca_cfg.ocsp.signer_key}"
        lines.append(f"OCSP signer of {name}: {kind}{where}, {signer.algorithm_name},"
                     f" valid until {_date(signer.not_after)}")
        warning = expiry_warning(signer, now)
        if warning:
            lines.append("warning: " + warning)
    for ca in config.cas:
        if ca.ocsp is None:
            lines.append(f"CA {ca.name}: no [ca.ocsp]: OCSP answers unauthorized for it")
    return lines

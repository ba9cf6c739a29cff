"""PKCS#11 mechanisms for the OCSP signature algorithms, and the r||s -> DER conversion.

Strategy: pure. ``choose_plan`` maps the signer certificate's key (and ``rsa_padding``) onto
what the token offers: a mechanism that hashes inside the token when there is one
(CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS, CKM_ECDSA_SHA256), else the raw mechanism on a
digest certpub computes (CKM_RSA_PKCS over a DigestInfo, CKM_RSA_PKCS_PSS, CKM_ECDSA; SoftHSM2
has only CKM_ECDSA). PKCS#11 returns an ECDSA signature as r||s (PKCS#11 §2.3.1); X.509 and
OCSP carry the DER SEQUENCE of two INTEGERs (RFC 3279 §2.2.3), which ``SignPlan.encode`` makes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, core
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Mechanism

MIN_RSA_BITS = 2048


# --- mechanisms -------------------------------------------------------------------------------

_HASHES: dict[str, tuple[Callable[[bytes], Any], type[hashes.HashAlgorithm], bytes]] = {
    # name: (hashlib constructor, cryptography hash, DER DigestInfo prefix for CKM_RSA_PKCS)
    "sha256": (hashlib.sha256, hashes.SHA256,
               bytes.fromhex("3031300d060960864801650304020105000420")),
    "sha384": (hashlib.sha384, hashes.SHA384,
               bytes.fromhex("3041300d060960864801650304020205000430")),
    "sha512": (hashlib.sha512, hashes.SHA512,
               bytes.fromhex("3051300d060960864801650304020305000440")),
}
_EC_CURVES = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}
_EC_HASHED = {"sha256": Mechanism.ECDSA_SHA256, "sha384": Mechanism.ECDSA_SHA384,
              "sha512": Mechanism.ECDSA_SHA512}


@dataclass(frozen=True)
class SignPlan:
    """How to make one signature on the token: mechanism, its parameter, what to hash first."""

    mechanism: Mechanism
    param: Any  # mechanism_param for python-pkcs11, or None
    prehash: str | None  # hash the data in-process (the mechanism takes a digest)
    digest_info: bool  # prefix the digest with its DER DigestInfo (CKM_RSA_PKCS)
    ecdsa: bool  # the token returns r||s; X.509 and OCSP want DER (RFC 3279 §2.2.3)
    algorithm_der: bytes  # the AlgorithmIdentifier the responses carry
    algorithm_name: str

    def payload(self, data: bytes) -> bytes:
        if self.prehash is None:
            return data
        hash_new, _, prefix = _HASHES[self.prehash]
        digest: bytes = hash_new(data).digest()
        return prefix + digest if self.digest_info else digest

    def encode(self, raw: bytes) -> bytes:
        if not self.ecdsa:
            return raw
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))


def choose_plan(public_key: Any, rsa_padding: str, available: set[Any]) -> SignPlan:
    """The mechanism for the certificate's key type: the token hashes when it can
    (CKM_SHA256_RSA_PKCS, CKM_ECDSA_SHA256), else certpub hashes and the token signs the
    digest (CKM_RSA_PKCS, CKM_ECDSA: SoftHSM2 offers only the latter for ECDSA).
    ValueError when the token offers neither."""
    def pick(*choices: Mechanism) -> Mechanism:
        for m in choices:
            if m in available:
                return m
        names = " or ".join("CKM_" + m.name for m in choices)
        raise ValueError(f"the token offers no mechanism to sign with this key (needs {names})")

    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS}"
                             " required")
        if rsa_padding == "pss":
            m = pick(Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.RSA_PKCS_PSS)
            params = algos.RSASSAPSSParams({
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
                "salt_length": 32,
            })
            alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pss", "parameters": params})
            return SignPlan(m, (Mechanism.SHA256, MGF.SHA256, 32),
                            None if m == Mechanism.SHA256_RSA_PKCS_PSS else "sha256", False,
                            False, alg.dump(), "rsassa_pss_sha256")
        m = pick(Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS)
        alg = algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa", "parameters": core.Null()})
        hashed = m == Mechanism.SHA256_RSA_PKCS
        return SignPlan(m, None, None if hashed else "sha256", not hashed, False, alg.dump(),
                        "sha256_rsa")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        hash_name = _EC_CURVES.get(public_key.curve.name)
        if hash_name is None:
            raise ValueError(f"EC curve {public_key.curve.name} is not supported"
                             " (P-256, P-384, P-521)")
        m = pick(_EC_HASHED[hash_name], Mechanism.ECDSA)
        name = f"{hash_name}_ecdsa"
        return SignPlan(m, None, None if m != Mechanism.ECDSA else hash_name, False, True,
                        algos.SignedDigestAlgorithm({"algorithm": name}).dump(), name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        m = pick(Mechanism.EDDSA)
        return SignPlan(m, None, None, False, False,
                        algos.SignedDigestAlgorithm({"algorithm": "ed25519"}).dump(), "ed25519")
    raise ValueError(f"{type(public_key).__name__} keys are not supported (RSA, ECDSA, Ed25519)")


def verify(public_key: Any, plan: SignPlan, data: bytes, signature: bytes) -> bool:
    """Does signature (as it will be sent) verify over data with the certificate's key?"""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PSS(padding.MGF1(hashes.SHA256()), 32)
                if plan.algorithm_name == "rsassa_pss_sha256" else padding.PKCS1v15())
            public_key.verify(signature, data, pad, hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            hash_type = _HASHES[_EC_CURVES[public_key.curve.name]][1]
            public_key.verify(signature, data, ec.ECDSA(hash_type()))
        else:
            public_key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True

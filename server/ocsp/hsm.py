"""OCSP signing keys held in a PKCS#11 token (an HSM, or SoftHSM2), behind ``Signer``.

Strategy: python-pkcs11 (Cython, releases the GIL during token calls, one exception class per
CKR_* code) drives the token. A ``Module`` is one PKCS#11 library in this process: loaded and
C_Initialize'd once, logged in once per token (a session opened with the PIN and kept open,
as PKCS#11 login state belongs to the application, not to a session), and re-initialised
(C_Finalize + C_Initialize) when a token stops answering or on SIGHUP. python-pkcs11 (like
PyKCS11) calls C_Initialize without CKF_OS_LOCKING_OK, which tells the library that it will
not be called from several threads at once (SoftHSM2 then turns its own mutexes off), so
every call into one library is made under ``Module.using``, one thread at a time; the GIL is
released meanwhile, so the reactor keeps answering from the cache while a store thread
signs, and ``certpub serve --workers N`` (one library per process) signs in parallel. A
``TokenKey`` is one private key in one token, with a small pool of sessions: a session is
never used by two threads (the PostgreSQL mode signs in store threads).

A failed signature is retried once on a fresh session, then once after re-initialising the
library (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, a token folder that vanished); if
that fails too the key is "down": every signature raises ``TokenUnavailable`` (an
``OcspError`` answered ``tryLater``, never a stale or unsigned answer) and is counted in
/metrics, until ``retry_interval`` has passed and one caller probes the token again; signing
resumes by itself when the token is back.

At start (``open_token_key``) everything a file key is checked for is checked here: the token
and the object exist, the PIN is accepted, the key is not extractable, its type and size fit
the certificate, the public key read from the token equals the certificate's, and one test
signature verifies against the certificate. Errors name the URI and what was wrong, never
the PIN.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pkcs11
from asn1crypto import core, keys
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from server.configtools import ConfigError
from server.lazylog import LazyLogger
from server.ocsp.codec import OcspError
from server.ocsp.config import Pkcs11Config
from server.ocsp.mechanisms import SignPlan, choose_plan, verify
from server.ocsp.p11uri import Pkcs11Uri
from server.ocsp.signer import SignerError

log = LazyLogger("server.ocsp.hsm")

POOL_WAIT = 2.0  # seconds a signature waits for a free session before tryLater
SESSIONS = 4  # sessions per key at most (one per thread signing at the same moment)
CHECK_DATA = b"certpub: does this token key match its certificate?"


class TokenUnavailable(OcspError):
    """The token did not sign (removed, not answering): answered tryLater."""

    status = "try_later"


class TokenKeyError(SignerError):
    """A token key that cannot be used at start; str() names the key path and the URI."""


# --- the library ------------------------------------------------------------------------------


class Module:
    """One PKCS#11 library in this process, shared by every key in its tokens."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.generation = 0  # bumped by each re-initialisation: older sessions are dead
        self._lib: Any = None
        self._cond = threading.Condition()
        self._users = 0
        self._resetting = False
        self._logins: dict[int, Any] = {}  # slot id -> the session that logged in

    @contextmanager
    def using(self) -> Iterator[int]:
        """A hold on the library, one thread at a time (see the module docstring); yields
        its generation."""
        with self._cond:
            while self._resetting or self._users:
                self._cond.wait()
            self._users += 1
            if self._lib is None:
                self._users -= 1
                self._cond.notify_all()
                raise p11.PKCS11Error("the PKCS#11 library is not initialised")
            generation = self.generation
        try:
            yield generation
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @property
    def lib(self) -> Any:
        return self._lib

    def load(self) -> None:
        """Load and initialise the library once (raises PKCS11Error)."""
        with self._cond:
            if self._lib is None:
                self._lib = pkcs11.lib(self.path)
                self.generation += 1

    def reset(self, seen: int | None = None) -> None:
        """C_Finalize + C_Initialize (SIGHUP, or a token that stopped answering), unless
        someone already did since generation ``seen``. Waits for signatures under way."""
        with self._cond:
            if seen is not None and seen != self.generation:
                return
            while self._resetting:
                self._cond.wait()
            self._resetting = True
            while self._users:
                self._cond.wait()
        try:
            self._logins.clear()  # C_Finalize closes every session (and so logs out)
            if self._lib is None:
                self._lib = pkcs11.lib(self.path)
            else:
                try:
                    self._lib.finalize()
                except p11.PKCS11Error:
                    pass  # e.g. CKR_CRYPTOKI_NOT_INITIALIZED after a failed initialise
                self._lib.initialize()
        finally:
            with self._cond:
                self.generation += 1
                self._resetting = False
                self._cond.notify_all()

    def login(self, token: Any, pin: str) -> None:
        """Log in to token once (a session kept open for it); call under ``using``."""
        slot_id = token.slot.slot_id
        with self._cond:
            if slot_id in self._logins:
                return
            try:
                self._logins[slot_id] = token.open(user_pin=pin)
            except p11.UserAlreadyLoggedIn:
                self._logins[slot_id] = None  # logged in already: nothing to keep


_modules: dict[str, Module] = {}
_modules_lock = threading.Lock()


def module_for(path: str) -> Module:
    """The process's Module for a library path (created, not yet loaded)."""
    with _modules_lock:
        found = _modules.get(path)
        if found is None:
            found = _modules[path] = Module(path)
        return found


# --- one key ----------------------------------------------------------------------------------


@dataclass
class _Session:
    generation: int
    session: Any
    key: Any


class TokenKey:
    """One private key in a token: a pool of sessions and ``sign``; repr shows no PIN."""

    def __init__(self, module: Module, uri: Pkcs11Uri, pin: str, *, ca_name: str,
                 sessions: int = SESSIONS, retry_interval: float = 1.0) -> None:
        self.module = module
        self.uri = uri
        self._pin = pin
        self.ca_name = ca_name
        self.size = sessions
        self.retry_interval = retry_interval
        self.plan: SignPlan | None = None
        self._cond = threading.Condition()
        self._idle: list[_Session] = []
        self._open = 0
        self._down_until = 0.0
        self._down_reason: str | None = None
        self._probing = False
        self.failures = 0  # signatures refused because the token did not answer

    def __repr__(self) -> str:
        return f"TokenKey({self.uri})"

    # --- finding things (under module.using) ---

    def find_token(self) -> Any:
        u = self.uri
        tokens = []
        for slot in self.module.lib.get_slots(token_present=True):
            if u.slot_id is not None and slot.slot_id != u.slot_id:
                continue
            try:
                token = slot.get_token()
            except (p11.TokenNotPresent, p11.TokenNotRecognised):
                continue
            if ((u.token is None or token.label == u.token)
                    and (u.serial is None or token.serial.decode("ascii", "replace").strip()
                         == u.serial)
                    and (u.manufacturer is None or token.manufacturer_id == u.manufacturer)
                    and (u.model is None or token.model == u.model)):
                tokens.append(token)
        if not tokens:
            raise p11.NoSuchToken("no token matches the URI")
        if len(tokens) > 1:
            raise p11.MultipleTokensReturned("several tokens match the URI: add serial= or"
                                             " slot-id=")
        return tokens[0]

    def find_key(self, session: Any) -> Any:
        attrs: dict[Any, Any] = {}
        if self.uri.object is not None:
            attrs["label"] = self.uri.object
        if self.uri.id is not None:
            attrs["id"] = self.uri.id
        return session.get_key(object_class=ObjectClass.PRIVATE_KEY, **attrs)

    def find_public(self, session: Any) -> Any:
        """The public key object beside the private one (same id and label), or None."""
        template: dict[Any, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
        if self.uri.object is not None:
            template[Attribute.LABEL] = self.uri.object
        if self.uri.id is not None:
            template[Attribute.ID] = self.uri.id
        found = list(session.get_objects(template))
        return found[0] if len(found) == 1 else None

    def _new_session(self, generation: int) -> _Session:
        token = self.find_token()
        self.module.login(token, self._pin)
        session = token.open()
        try:
            key = self.find_key(session)
        except BaseException:
            _close_quietly(session)
            raise
        return _Session(generation, session, key)

    # --- the pool ---

    def _borrow(self, generation: int) -> _Session:
        deadline = time.monotonic() + POOL_WAIT
        with self._cond:
            while True:
                while self._idle:
                    s = self._idle.pop()
                    if s.generation == generation:
                        return s
                    self._open -= 1  # a session of a finalised library: forget it
                if self._open < self.size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TokenUnavailable(f"all {self.size} sessions of {self.uri} busy")
                self._cond.wait(left)
        try:
            return self._new_session(generation)
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _give_back(self, s: _Session) -> None:
        with self._cond:
            self._idle.append(s)
            self._cond.notify()

    def _drop(self, s: _Session) -> None:
        _close_quietly(s.session)
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def close(self) -> None:
        """Close the idle sessions (the login session stays with the Module)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for s in idle:
            if s.generation == self.module.generation:
                _close_quietly(s.session)

    # --- signing ---

    def _sign_once(self, payload: bytes) -> tuple[int, bytes | None, BaseException | None]:
        plan = self.plan
        assert plan is not None
        generation = -1
        try:
            with self.module.using() as generation:
                s = self._borrow(generation)
                try:
                    raw = s.key.sign(payload, mechanism=plan.mechanism,
                                     mechanism_param=plan.param)
                except BaseException:
                    self._drop(s)
                    raise
                self._give_back(s)
                return generation, raw, None
        except TokenUnavailable:
            raise
        except p11.PKCS11Error as exc:
            return generation, None, exc

    def sign(self, data: bytes) -> bytes:
        """The signature of data, made by the token; TokenUnavailable when it cannot."""
        plan = self.plan
        assert plan is not None
        with self._cond:
            if time.monotonic() < self._down_until or self._probing:
                self._refused(self._down_reason or "token unavailable")
            probing = self._down_reason is not None
            self._probing = probing
        try:
            payload = plan.payload(data)
            try:
                generation, raw, error = self._sign_once(payload)
            except TokenUnavailable as exc:  # every session busy: this request only
                self._refused(str(exc))
            if error is not None:  # a dead session: once more on a fresh one
                generation, raw, error = self._sign_once(payload)
            if error is not None:  # a removed or reset token: re-initialise, then once more
                try:
                    self.module.reset(generation if generation >= 0 else None)
                except p11.PKCS11Error as exc:  # e.g. SoftHSM2 without its token folder
                    error = exc
                else:
                    generation, raw, error = self._sign_once(payload)
            if error is not None or raw is None:
                self._went_down(_describe(error))
            assert raw is not None
            if probing:
                log.info("OCSP signer of CA {ca}: token {uri} answers again", ca=self.ca_name,
                         uri=str(self.uri))
            with self._cond:
                self._down_reason = None
            return plan.encode(raw)
        finally:
            if probing:
                with self._cond:
                    self._probing = False

    def _went_down(self, reason: str) -> None:
        with self._cond:
            first = self._down_reason is None
            self._down_reason = reason
            self._down_until = time.monotonic() + self.retry_interval
        if first:
            log.warn("OCSP signer of CA {ca}: token {uri} does not sign ({reason});"  # noqa: G010
                     " answering tryLater until it does", ca=self.ca_name, uri=str(self.uri),
                     reason=reason)
        self._refused(reason)

    def _refused(self, reason: str) -> None:
        self.failures += 1
        try:
            from server.metrics import get_metrics

            get_metrics().signer_unavailable(self.ca_name)
        except Exception:  # noqa: BLE001 - metrics never stop an answer
            pass
        raise TokenUnavailable(f"signer token of CA {self.ca_name} unavailable: {reason}")

    def signing_function(self, rsa_padding: str = "pkcs1v15") -> tuple[Callable[[bytes], bytes],
                                                                       bytes, str]:
        """(sign, AlgorithmIdentifier DER, name), as ``server.ocsp.signer.signing_function``."""
        assert self.plan is not None
        return self.sign, self.plan.algorithm_der, self.plan.algorithm_name


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001,S110 - a dead session cannot be closed twice
        pass


def _describe(exc: BaseException | None) -> str:
    """A short reason naming the CKR_ code (library messages never carry the PIN)."""
    if exc is None:
        return "no signature"
    names = {
        p11.DeviceRemoved: "CKR_DEVICE_REMOVED", p11.SessionHandleInvalid:
        "CKR_SESSION_HANDLE_INVALID", p11.TokenNotPresent: "CKR_TOKEN_NOT_PRESENT",
        p11.ObjectHandleInvalid: "CKR_OBJECT_HANDLE_INVALID", p11.KeyHandleInvalid:
        "CKR_KEY_HANDLE_INVALID", p11.DeviceError: "CKR_DEVICE_ERROR",
        p11.GeneralError: "CKR_GENERAL_ERROR", p11.SessionClosed: "CKR_SESSION_CLOSED",
        p11.NoSuchToken: "token not found", p11.NoSuchKey: "key object not found",
        p11.UserNotLoggedIn: "CKR_USER_NOT_LOGGED_IN", p11.PinIncorrect: "CKR_PIN_INCORRECT",
    }
    for cls, name in names.items():
        if isinstance(exc, cls):
            return name
    return type(exc).__name__


# --- opening and checking at start ------------------------------------------------------------


def read_pin(cfg: Pkcs11Config) -> str:
    """The user PIN from pin_file (owner-only) or pin_env; errors never show it."""
    if cfg.pin_file is not None:
        from server.ocsp.signer import check_key_file

        check_key_file(cfg.pin_file, "pkcs11.pin_file")
        try:
            text = cfg.pin_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError("pkcs11.pin_file", f"cannot read {cfg.pin_file}: {reason}") from None
        pin = text.rstrip("\r\n")
        if not pin:
            raise ConfigError("pkcs11.pin_file", f"{cfg.pin_file} is empty")
        return pin
    assert cfg.pin_env is not None
    value = os.environ.get(cfg.pin_env)
    if not value:
        raise ConfigError("pkcs11.pin_env", f"environment variable {cfg.pin_env} is not set")
    return value


def _token_public_key(tk: TokenKey, session: Any, key: Any) -> Any:
    """The public key as the token holds it (RSA: the private object's modulus; EC/EdDSA:
    the public object's CKA_EC_POINT), as a cryptography key; None if the token has none."""
    if key.key_type == KeyType.RSA:
        n = int.from_bytes(key[Attribute.MODULUS], "big")
        e = int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    pub = tk.find_public(session)
    if pub is None:
        return None
    point = bytes(pub[Attribute.EC_POINT])
    try:  # CKA_EC_POINT is a DER OCTET STRING (some tokens give the bare point)
        point = core.OctetString.load(point).native
    except ValueError:
        pass
    if key.key_type == KeyType.EC_EDWARDS:
        return ed25519.Ed25519PublicKey.from_public_bytes(point)
    params = keys.ECDomainParameters.load(bytes(key[Attribute.EC_PARAMS]))
    curve = _CURVES.get(params.chosen.native)
    if curve is None:
        return None
    return ec.EllipticCurvePublicKey.from_encoded_point(curve(), point)


_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1, "secp521r1": ec.SECP521R1}
_KEY_TYPES = {KeyType.RSA: "RSA", KeyType.EC: "EC", KeyType.EC_EDWARDS: "Ed25519"}


def _cert_kind(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(public_key).__name__


def open_token_key(cfg: Pkcs11Config, uri: Pkcs11Uri, cert_public_key: Any, *, ca_name: str,
                   rsa_padding: str, key: str, cert_path: str) -> TokenKey:
    """Open and check the key at uri for a certificate's public key; TokenKeyError names key."""
    def fail(what: str) -> TokenKeyError:
        return TokenKeyError(key, f"{uri}: {what}")

    pin = read_pin(cfg)
    module = module_for(str(cfg.module))
    try:
        module.load()
    except p11.PKCS11Error as exc:
        raise TokenKeyError("pkcs11.module", f"{cfg.module} cannot be loaded as a PKCS#11"
                            f" library: {exc}") from None
    for attempt in range(START_ATTEMPTS):
        tk = TokenKey(module, uri, pin, ca_name=ca_name, retry_interval=cfg.retry_interval)
        try:
            _open_checked(tk, module, cfg, cert_public_key, rsa_padding, cert_path, fail)
            return tk
        except TokenKeyError:
            raise
        except p11.PKCS11Error as exc:
            # A token busy with another process (two workers logging in to SoftHSM2 at the
            # same moment: CKR_GENERAL_ERROR) gets a second look before the start fails.
            if attempt == START_ATTEMPTS - 1 or not isinstance(exc, _TRANSIENT):
                raise fail(f"the token failed: {_describe(exc)}") from None
            time.sleep(0.2 * (attempt + 1))
            try:
                module.reset()
            except p11.PKCS11Error:
                pass
    raise AssertionError("unreachable")


START_ATTEMPTS = 3
_TRANSIENT = (p11.GeneralError, p11.DeviceError, p11.FunctionFailed, p11.SessionHandleInvalid,
              p11.DeviceRemoved, p11.TokenNotPresent)


def _open_checked(tk: TokenKey, module: Module, cfg: Pkcs11Config, cert_public_key: Any,
                  rsa_padding: str, cert_path: str,
                  fail: Callable[[str], TokenKeyError]) -> None:
    """The checks of ``open_token_key``; the key's first session is left in its pool."""
    uri, pin = tk.uri, tk._pin
    with module.using() as generation:
        try:
            token = tk.find_token()
        except p11.NoSuchToken:
            present = sorted(t.label for t in _tokens(module))
            raise fail("no token matches (tokens present: "
                       f"{', '.join(present) or 'none'})") from None
        except p11.MultipleTokensReturned as exc:
            raise fail(str(exc)) from None
        try:
            module.login(token, pin)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            raise fail("the token refused the PIN (CKR_PIN_INCORRECT); check [pkcs11] "
                       + ("pin_file" if cfg.pin_file else "pin_env")) from None
        except p11.PinLocked:
            raise fail("the token's user PIN is locked (CKR_PIN_LOCKED)") from None
        except p11.PinExpired:
            raise fail("the token's user PIN has expired (CKR_PIN_EXPIRED)") from None
        except p11.UserPinNotInitialized:
            raise fail("the token has no user PIN yet (CKR_USER_PIN_NOT_INITIALIZED)") \
                from None
        session = token.open()
        try:
            try:
                pkey = tk.find_key(session)
            except p11.NoSuchKey:
                raise fail(f"no private key object {_what(uri)} in token {token.label!r}")\
                    from None
            except p11.MultipleObjectsReturned:
                raise fail(f"several private keys match {_what(uri)}: add id= to the URI")\
                    from None
            kind = _KEY_TYPES.get(pkey.key_type, str(pkey.key_type))
            if kind != _cert_kind(cert_public_key):
                raise fail(f"the token holds an {kind} key but the certificate {cert_path}"
                           f" has an {_cert_kind(cert_public_key)} key")
            if pkey[Attribute.EXTRACTABLE] or not pkey[Attribute.SENSITIVE]:
                raise fail("the key is extractable or not sensitive; a signing key must"
                           " never leave the token (CKA_EXTRACTABLE false, CKA_SENSITIVE"
                           " true)")
            try:
                tk.plan = choose_plan(cert_public_key, rsa_padding,
                                      set(token.slot.get_mechanisms()))
            except ValueError as exc:
                raise fail(str(exc)) from None
            token_public = _token_public_key(tk, session, pkey)
            if token_public is not None and _spki(token_public) != _spki(cert_public_key):
                raise fail(f"the key does not match the certificate {cert_path} (public keys"
                           " differ)")
            raw = pkey.sign(tk.plan.payload(CHECK_DATA), mechanism=tk.plan.mechanism,
                            mechanism_param=tk.plan.param)
            if not verify(cert_public_key, tk.plan, CHECK_DATA, tk.plan.encode(raw)):
                raise fail(f"the key does not match the certificate {cert_path} (a test"
                           " signature does not verify)")
            tk._idle.append(_Session(generation, session, pkey))
            tk._open = 1
        except BaseException:
            _close_quietly(session)
            raise


def reopen_modules(cfg: Pkcs11Config | None) -> None:
    """SIGHUP: re-initialise the configured library (a replaced token, a new SOFTHSM2_CONF)."""
    if cfg is None:
        return
    module = module_for(str(cfg.module))
    if module.lib is not None:
        try:
            module.reset()
        except p11.PKCS11Error as exc:
            raise TokenKeyError("pkcs11.module", f"{cfg.module}: re-initialising failed:"
                                f" {_describe(exc)}") from None


def _tokens(module: Module) -> list[Any]:
    out = []
    for slot in module.lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except p11.PKCS11Error:
            continue
        if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:  # not SoftHSM2's free slot
            out.append(token)
    return out


def _what(uri: Pkcs11Uri) -> str:
    parts = []
    if uri.object is not None:
        parts.append(f"labelled {uri.object!r}")
    if uri.id is not None:
        parts.append(f"with id {uri.id.hex()}")
    return " ".join(parts)


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return data

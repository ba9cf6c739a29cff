"""PKCS#11 URIs (RFC 7512): which token and which key object a signer key names.

Strategy: pure parsing into a frozen ``Pkcs11Uri``. Only what selects a token and a private
key is accepted (``token``, ``manufacturer``, ``model``, ``serial``, ``slot-id``, ``object``,
``id``, ``type=private``); anything else is refused with the attribute named, so a misspelt
attribute never silently selects another key. A PIN in the URI (``pin-value``, ``pin-source``)
is refused: the PIN comes from ``[pkcs11] pin_file`` or ``pin_env`` and must never sit in a
string that ends up in logs and error messages, as a key's URI does.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from server.configtools import ConfigError

SCHEME = "pkcs11:"
_TEXT_ATTRS = {"token": "token", "manufacturer": "manufacturer", "model": "model",
               "serial": "serial", "object": "object"}
_PIN_ATTRS = ("pin-value", "pin-source")


@dataclass(frozen=True)
class Pkcs11Uri:
    """A private key in a PKCS#11 token; ``str()`` is the URI as configured (it has no PIN)."""

    text: str
    token: str | None = None  # CKA_LABEL of the token (CK_TOKEN_INFO.label)
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    object: str | None = None  # CKA_LABEL of the key
    id: bytes | None = None  # CKA_ID of the key

    def __str__(self) -> str:
        return self.text


def is_pkcs11_uri(value: object) -> bool:
    return isinstance(value, str) and value[:len(SCHEME)].lower() == SCHEME


def _decode(raw: str, key: str, name: str) -> bytes:
    if "%" in raw:
        parts = raw.split("%")
        for part in parts[1:]:
            if len(part) < 2 or any(c not in "0123456789abcdefABCDEF" for c in part[:2]):
                raise ConfigError(key, f"attribute {name} has a bad percent-escape (RFC 7512 §2.3)")
    return unquote_to_bytes(raw)


def parse_pkcs11_uri(text: str, key: str) -> Pkcs11Uri:
    """Parse ``pkcs11:token=…;object=…`` (RFC 7512 §2.3); ConfigError names ``key``."""
    if not is_pkcs11_uri(text):
        raise ConfigError(key, f"expected a pkcs11: URI; got {text[:40]!r}")
    body = text[len(SCHEME):]
    path, _, query = body.partition("?")
    if query:
        names = [q.partition("=")[0] for q in query.split("&")]
        if any(n in _PIN_ATTRS for n in names):
            raise ConfigError(key, "the URI must not carry the PIN: set [pkcs11] pin_file or"
                              " pin_env")
        raise ConfigError(key, f"query attribute {names[0]!r} is not supported (the module is"
                          " [pkcs11] module, the PIN [pkcs11] pin_file or pin_env)")
    values: dict[str, object] = {}
    for item in path.split(";") if path else []:
        name, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(key, f"expected attribute=value in the URI; got {name[:40]!r}")
        if name in values or (name == "slot-id" and "slot_id" in values):
            raise ConfigError(key, f"attribute {name} appears twice")
        if name in _PIN_ATTRS:
            raise ConfigError(key, "the URI must not carry the PIN: set [pkcs11] pin_file or"
                              " pin_env")
        data = _decode(raw, key, name)
        if name in _TEXT_ATTRS:
            try:
                values[_TEXT_ATTRS[name]] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(key, f"attribute {name} is not UTF-8") from None
        elif name == "id":
            if not data:
                raise ConfigError(key, "attribute id is empty")
            values["id"] = data
        elif name == "slot-id":
            try:
                values["slot_id"] = int(data.decode("ascii"), 10)
            except (UnicodeDecodeError, ValueError):
                raise ConfigError(key, "attribute slot-id must be a decimal number") from None
        elif name == "type":
            if data != b"private":
                raise ConfigError(key, "attribute type must be private (the signing key)")
        else:
            raise ConfigError(key, f"attribute {name!r} is not supported (token, manufacturer,"
                              " model, serial, slot-id, object, id, type)")
    if "object" not in values and "id" not in values:
        raise ConfigError(key, "the URI names no key: give object=LABEL or id=%XX…")
    return Pkcs11Uri(text=text, **values)  # type: ignore[arg-type]

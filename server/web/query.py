"""What a visitor asked: the search form's parameters, parsed and checked (pure).

Strategy: ``parse_search`` turns the raw query string into a ``Search`` — which lookup (mail,
name, serial, fingerprint), the normalised value the store index holds, the CA and the
page — or raises ``QueryError`` naming what was wrong with a catalog key and its
placeholders, so the page and the JSON API say the same thing. In "any" mode the kind is
guessed from the text: an ``@`` is a mail address, 64 hex digits a fingerprint, a ``0x``
or colon-separated hex a serial; bare hex digits are tried as a serial and as a name.
Nothing here reads the store or knows HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs

from store.names import prep_value

MAX_QUERY = 256  # characters of search text (longer: an error, never a lookup)
MAX_QUERY_STRING = 2048  # bytes of the whole query string
PAGE_SIZE = 20
MAX_RESULTS = 100  # matches listed at most; more: "refine your search"
MAX_PAGE = (MAX_RESULTS + PAGE_SIZE - 1) // PAGE_SIZE
KINDS = ("any", "mail", "name", "serial", "sha256")

_HEX = re.compile(r"[0-9a-f]+\Z")
_SEPARATORS = re.compile(r"[\s:.\-]")


class QueryError(ValueError):
    """A search that cannot be run: ``key`` is its catalog message, ``args`` the placeholders."""

    def __init__(self, key: str, **args: object) -> None:
        super().__init__(key)
        self.key = key
        self.args_ = args


@dataclass(frozen=True)
class Search:
    """One search: the lookups to make and what to show of them."""

    text: str  # what the visitor typed (shown back, escaped)
    kind: str  # the form's choice: any, mail, name, serial, sha256
    mail: str | None  # normalised mail address (equality)
    name: str | None  # normalised cn prefix
    serial: int | None
    sha256: bytes | None
    ca: str  # CA name, "" for all
    page: int

    @property
    def empty(self) -> bool:
        return not self.text


def parse_serial(text: str) -> int | None:
    """A serial number in any common spelling: hex with or without ``0x``, colons, spaces or
    dashes, leading zeros; ``None`` when it is not one."""
    t = _SEPARATORS.sub("", text.strip().lower())
    if t.startswith("0x"):
        t = t[2:]
    if not t or len(t) > 64 or not _HEX.match(t):
        return None
    return int(t, 16)


def parse_sha256(text: str) -> bytes | None:
    """A SHA-256 fingerprint: 64 hex digits, any case, with or without colons or spaces."""
    t = text.strip().lower()
    if t.startswith("sha256:"):
        t = t[7:]
    t = _SEPARATORS.sub("", t)
    if len(t) != 64 or not _HEX.match(t):
        return None
    return bytes.fromhex(t)


def _one(params: dict[str, list[str]], name: str) -> str:
    values = params.get(name)
    return values[-1] if values else ""


def parse_search(query: bytes | None) -> Search:
    """The search a query string asks for; raises QueryError (with a catalog key)."""
    raw = query or b""
    if len(raw) > MAX_QUERY_STRING:
        raise QueryError("error_query_too_long", max=MAX_QUERY)
    try:
        params = parse_qs(raw.decode("utf-8", "strict"), keep_blank_values=True,
                          strict_parsing=False, errors="strict", max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise QueryError("error_bad_query") from None
    text = _one(params, "q").strip()
    if len(text) > MAX_QUERY:
        raise QueryError("error_query_too_long", max=MAX_QUERY)
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise QueryError("error_bad_query")
    kind = _one(params, "type") or "any"
    if kind not in KINDS:
        raise QueryError("error_bad_type")
    ca = _one(params, "ca").strip()
    if len(ca) > 64:
        raise QueryError("error_unknown_ca", ca=ca[:64])
    page_text = _one(params, "page") or "1"
    if not page_text.isdigit() or not 1 <= int(page_text) <= MAX_PAGE:
        raise QueryError("error_bad_page", max=MAX_PAGE)
    page = int(page_text)
    mail = name = None
    serial: int | None = None
    digest: bytes | None = None
    if text:
        if kind == "mail" or (kind == "any" and "@" in text):
            mail = prep_value(text)
        elif kind == "sha256":
            digest = parse_sha256(text)
            if digest is None:
                raise QueryError("error_bad_sha256", text=text)
        elif kind == "serial":
            serial = parse_serial(text)
            if serial is None:
                raise QueryError("error_bad_serial", text=text)
        elif kind == "name":
            name = prep_value(text)
        else:  # any: guess
            digest = parse_sha256(text) if len(_SEPARATORS.sub("", text)) >= 64 else None
            if digest is None:
                serial = parse_serial(text)
                spelled_as_serial = text.lower().startswith("0x") or ":" in text
                if serial is None or not spelled_as_serial:
                    name = prep_value(text)
    return Search(text, kind, mail, name or None, serial, digest, ca, page)

"""The pages' languages: message catalogs and the choice of language (pure).

Strategy: one JSON catalog per language in ``catalogs/`` (``en``, ``zh-Hant``, ``pt``), each a
map of message keys to whole sentences with named placeholders (``{date}``), never fragments
to be glued; every catalog has every key with the same placeholders (a test checks). The
language is the ``lang`` query parameter when it names one, else the best match of
``Accept-Language`` (RFC 9110 §12.5.4: q-values, ``zh-TW``/``zh-HK``/``zh-MO``/``zh`` →
Traditional Chinese, ``pt-BR`` → Portuguese), else English.
"""

from __future__ import annotations

import json
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

LANGUAGES: tuple[str, ...] = ("en", "zh-Hant", "pt")
DEFAULT = "en"
NATIVE_NAMES = {"en": "English", "zh-Hant": "繁體中文", "pt": "Português"}
_CATALOGS = Path(__file__).parent / "catalogs"
_MAX_ACCEPT = 1024  # bytes of Accept-Language looked at


@lru_cache(maxsize=None)
def catalog(lang: str) -> dict[str, str]:
    """The messages of one language."""
    if lang not in LANGUAGES:
        raise KeyError(lang)
    with open(_CATALOGS / f"{lang}.json", encoding="utf-8") as f:
        data: dict[str, str] = json.load(f)
    return data


def placeholders(message: str) -> set[str]:
    """The named placeholders of a message."""
    return {name for _, name, _, _ in string.Formatter().parse(message) if name}


@lru_cache(maxsize=None)
def escaped(lang: str) -> dict[str, Markup]:
    """The messages of one language escaped once for HTML (the templates' ``m.key`` for a
    message without placeholders: no call and no escaping per page)."""
    return {k: Markup(escape(v)) for k, v in catalog(lang).items()}


class Translator:
    """The messages of one language, formatted with named values."""

    def __init__(self, lang: str) -> None:
        self.lang = lang
        self.messages = catalog(lang)
        self.escaped = escaped(lang)

    def __call__(self, key: str, **values: Any) -> str:
        message = self.messages[key]
        return message.format_map(values) if values else message


def _tag(tag: str) -> str | None:
    t = tag.strip().lower()
    if t in ("zh-hant", "zh-tw", "zh-hk", "zh-mo", "zh") or t.startswith("zh-hant-"):
        return "zh-Hant"
    if t.startswith("zh-"):  # Simplified Chinese readers read Traditional better than English
        return "zh-Hant"
    if t == "pt" or t.startswith("pt-"):
        return "pt"
    if t == "en" or t.startswith("en-"):
        return "en"
    return None


def from_accept_language(header: bytes | None) -> str:
    """The best language for an Accept-Language value (RFC 9110 §12.5.4); English by default."""
    if not header:
        return DEFAULT
    best, best_q = DEFAULT, 0.0
    for position, item in enumerate(header[:_MAX_ACCEPT].decode("latin-1").split(",")):
        tag, _, params = item.partition(";")
        q = 1.0
        params = params.strip().lower()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                continue
        lang = _tag(tag)
        # earlier items win ties: compare with a tiny penalty per position
        score = q - position * 1e-6
        if lang is not None and q > 0 and score > best_q:
            best, best_q = lang, score
    return best


def choose(lang_param: str, accept_language: bytes | None) -> tuple[str, bool]:
    """(language, whether it was chosen explicitly with ``lang=``)."""
    if lang_param in LANGUAGES:
        return lang_param, True
    return from_accept_language(accept_language), False

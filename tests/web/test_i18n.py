"""The catalogs are complete and whole sentences; the language follows the visitor."""

from __future__ import annotations

import pytest

from server.web import i18n


def test_every_language_has_every_message_with_the_same_placeholders() -> None:
    english = i18n.catalog("en")
    for lang in i18n.LANGUAGES:
        messages = i18n.catalog(lang)
        assert messages.keys() == english.keys(), lang
        for key, text in messages.items():
            assert i18n.placeholders(text) == i18n.placeholders(english[key]), (lang, key)
            assert text.strip() and text == text.strip(), (lang, key)


def test_translations_differ_from_english() -> None:
    english = i18n.catalog("en")
    same_ok = {"key_rsa", "key_dsa"}  # "RSA, {bits} bits" reads the same in Portuguese
    for lang in ("zh-Hant", "pt"):
        messages = i18n.catalog(lang)
        same = {k for k in english if messages[k] == english[k]} - same_ok
        assert not same, (lang, same)


@pytest.mark.parametrize("header,lang", [
    (None, "en"), (b"", "en"), (b"fr-FR,fr;q=0.9", "en"),
    (b"zh-TW,zh;q=0.9,en;q=0.8", "zh-Hant"), (b"zh-HK", "zh-Hant"), (b"zh-MO", "zh-Hant"),
    (b"zh-Hant-MO", "zh-Hant"), (b"zh-CN", "zh-Hant"), (b"pt-PT", "pt"), (b"pt-BR,pt;q=0.9", "pt"),
    (b"en;q=0.5, pt;q=0.8", "pt"), (b"en, pt", "en"), (b"pt;q=0, en;q=0.1", "en"),
    (b"pt;q=abc, zh", "zh-Hant"), (b"*", "en"), (b"x" * 5000, "en"),
])
def test_accept_language(header: bytes | None, lang: str) -> None:
    assert i18n.from_accept_language(header) == lang


def test_lang_parameter_wins() -> None:
    assert i18n.choose("pt", b"zh-TW") == ("pt", True)
    assert i18n.choose("klingon", b"zh-TW") == ("zh-Hant", False)
    assert i18n.choose("", None) == ("en", False)

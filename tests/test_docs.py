"""The README is a short entry point and every relative link in it and in docs/ resolves.

Links are checked as GitHub renders them: a relative path must name a file or folder of the
repository, and a ``#anchor`` must be the GitHub slug of a heading (or an explicit
``<a id=…>``) of the file it points into. Fenced code blocks and inline code are not prose:
links and headings inside them do not count.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 15_000  # characters: an entry point read in minutes; reference goes to docs/

_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(_CODE_SPAN.sub(lambda m: "code", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes in a Markdown file: heading slugs (repeats get -1, -2, …)
    and explicit ``<a id=…>``/``<a name=…>``."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2).replace("`", ""))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The link and image targets of a Markdown file's prose."""
    targets: list[str] = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        targets.extend(_LINK.findall(line))
        ref = _REFERENCE.match(line)
        if ref is not None:
            targets.append(ref.group(1))
    return targets


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """What does not resolve among path's relative links, one line each."""
    out: list[str] = []
    for target in links(path):
        if not target or _SCHEME.match(target):
            continue  # http:, https:, mailto:, file: are not the repository's
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}: {target}"
        if root.resolve() not in dest.parents and dest != root.resolve():
            out.append(f"{where}: outside the repository")
        elif not dest.exists():
            out.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            out.append(f"{where}: no heading with that anchor in {dest.name}")
    return out


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_is_an_entry_point() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters"
    # the two commands, as a newcomer copies them, and they exist
    assert re.search(r"^scripts/demo\b", text, re.MULTILINE)
    assert re.search(r"^scripts/test\b", text, re.MULTILINE)
    assert (REPO / "scripts/demo").is_file() and (REPO / "scripts/test").is_file()
    # a decision the issue tracker asked to keep in view
    assert "oscrypto" in text and "OpenSSL 3.0.10" in text


def test_the_readme_indexes_every_doc() -> None:
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")
              if t.startswith("docs/")}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], "docs/ files the README does not link to"


@pytest.mark.parametrize("heading, expected", [
    ("Import (issue 14)", "import-issue-14"),
    ("OCSP keys in an HSM (PKCS#11)", "ocsp-keys-in-an-hsm-pkcs11"),
    ("Under overload: cheap answers first, signing bounded and shed",
     "under-overload-cheap-answers-first-signing-bounded-and-shed"),
    ("OpenSSL CA databases (index.txt)", "openssl-ca-databases-indextxt"),
    ("The demo's token", "the-demos-token"),
    ("Re-measured at 07:31 UTC (this session's code: cheaper log lines, DER-built responses)",
     "re-measured-at-0731-utc-this-sessions-code-cheaper-log-lines-der-built-responses"),
    ("Nonce — then the [cache](x.md)", "nonce--then-the-cache"),
    ("搜尋 Search", "搜尋-search"),
])
def test_slugs_are_githubs(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_the_check_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.md").write_text("# A\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#two-words) [ok](docs/a.md#two-words-1) [ok](#top) <a id=\"top\"></a>\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#three) [out](../elsewhere.md)\n"
        "`[in code](nowhere.md)` [web](https://example.org/x.md)\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[ref]: docs/missing.md\n", encoding="utf-8")
    assert broken_links(page, tmp_path) == [
        "README.md: docs/b.md: no such file",
        "README.md: docs/a.md#three: no heading with that anchor in a.md",
        "README.md: ../elsewhere.md: outside the repository",
        "README.md: docs/missing.md: no such file",
    ]

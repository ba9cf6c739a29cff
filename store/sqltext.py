"""The SQL text helpers the read half (``store.sqlbase``) and the write half
(``store.writer``) share: serials as exact text, timestamps, root-first DN keys, bounds.

Neither half imports the other for these (the read half only reaches ``store.writer`` when a
batch starts), so the two modules no longer import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from store.model import Serial

# Above every character a key or value can hold: an exclusive upper bound of a prefix range.
# Byte-wise comparison of UTF-8 orders by code point, so this holds on both engines.
TOP = "\U0010ffff"
IN_LIMIT = 500  # values in one ``IN (...)`` list (SQLite allows 32,766 parameters)


def serial_text(serial: int) -> str:
    """Exact, canonical text of a serial: lower-case hex without leading zeros."""
    return format(serial, "x") if serial >= 0 else "-" + format(-serial, "x")


def serial_int(text: str) -> Serial:
    return Serial(int(text, 16))


def ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def reversed_key(key: str) -> str:
    """Root-first form of a DN key, so that a subtree is a range of one index."""
    if not key:
        return ""
    if "\\" not in key:  # no escapes: every comma separates RDNs
        return "\x01".join(reversed(key.split(","))) + "\x01"
    # RDN separators in keys are unescaped commas; escaped ones are preceded by a backslash.
    parts: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in key:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    # "\x01" sorts below every printable character, so "a\x01" < "a\x01b" < "a\x02".
    return "".join(p + "\x01" for p in reversed(parts))



def like_pattern(initial: str, any_: Sequence[str], final: str) -> str:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    return esc(initial) + "%" + "".join(esc(a) + "%" for a in any_ if a) + esc(final)

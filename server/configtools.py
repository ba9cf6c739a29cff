"""Reading TOML tables into typed values, with errors that name the key path.

Strategy: a ``Section`` wraps one TOML table and remembers which keys were read; ``done()``
rejects whatever is left, so an unknown (misspelt) key stops the start instead of being
silently ignored. Each package parses its own section into its own frozen dataclass.
``check_key_file`` (owner-only key, PIN and TLS key files) and its ``SignerError`` live here
with the other checks, so the config modules need not import the OCSP signer.
"""

from __future__ import annotations

import difflib
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_MISSING: Any = object()
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """A configuration value that is missing or wrong; str() names the key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class SignerError(ConfigError):
    """A signer that cannot be used; str() names the configuration key and the reason."""


def check_key_file(path: Path, key: str) -> None:
    """Refuse a key file that group or others may access (it must be owner-only)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise SignerError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SignerError(
            key, f"{path} has mode {mode:04o}: a private key must not be readable by group or"
            f" others; run chmod 600 {path}")


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


class Section:
    """One TOML table; every getter names ``path.key`` in its errors."""

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a table, got {_type_name(data)}")
        self.data: dict[str, Any] = data
        self.path = path
        self._seen: set[str] = set()
        self._known: set[str] = set()  # every key a getter or has() asked for: the suggestions

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        self._known.add(key)
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        self._known.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ConfigError(self.key(key), "is required")
        return default

    def _typed(self, key: str, value: Any, kind: type[T] | tuple[type, ...], what: str) -> T:
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(self.key(key), f"expected {what}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.key(key), f"expected {what}, got {_type_name(value)}")
        return value  # type: ignore[return-value]

    def str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> Any:
        value = self._get(key, default)
        if value is None or value is default and default is not _MISSING:
            return value
        value = self._typed(key, value, str, "a string")
        if choices is not None and value not in choices:
            raise ConfigError(self.key(key), f"expected one of {', '.join(choices)}; got {value!r}")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        return value if value is default else self._typed(key, value, bool, "true or false")

    def int(self, key: str, default: Any = _MISSING, *, min: int | None = None,
            max: int | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        value = self._typed(key, value, int, "an integer")
        self._check_range(key, value, min, max)
        return value

    def float(self, key: str, default: Any = _MISSING, *, min: float | None = None,
              max: float | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        value = float(self._typed(key, value, (int, float), "a number"))
        self._check_range(key, value, min, max)
        return value

    def duration(self, key: str, default: Any = _MISSING, *, min: float | None = None,
                 max: float | None = None) -> Any:
        """Seconds, from a number or a string like "30s", "15m", "8h", "2d"."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise ConfigError(self.key(key), f"expected a duration such as 30s, 8h or 2d; got {value!r}")
        self._check_range(key, seconds, min, max, unit=" seconds")
        return seconds

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None,
                     unit: str = "") -> None:
        if lo is not None and value < lo:
            raise ConfigError(self.key(key), f"must be at least {lo:g}{unit}; got {value:g}")
        if hi is not None and value > hi:
            raise ConfigError(self.key(key), f"must be at most {hi:g}{unit}; got {value:g}")

    def path_(self, key: str, default: Any = _MISSING) -> Any:
        value = self.str(key, default)
        if value is None or (value is default and default is not _MISSING and not isinstance(value, str)):
            return value
        if not value:
            raise ConfigError(self.key(key), "expected a file or folder path, got an empty string")
        return Path(value).expanduser()

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            value = [value]
        value = self._typed(key, value, list, "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.key(key)}[{i}]", f"expected a string, got {_type_name(item)}")
        return tuple(value)

    def section(self, key: str, required: bool = False) -> Section:
        value = self._get(key, _MISSING if required else {})
        return Section(value, self.key(key))

    def sections(self, key: str) -> list[Section]:
        """An array of tables (``[[key]]``)."""
        value = self._get(key, [])
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(self.key(key), f"expected an array of tables, got {_type_name(value)}")
        return [Section(item, f"{self.key(key)}[{i}]") for i, item in enumerate(value)]

    def done(self) -> None:
        """Reject every key that no getter asked for."""
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key" + self.suggest(unknown[0]) + (
                f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))

    def suggest(self, key: str) -> str:
        """`` (did you mean KEY?)`` naming the known key closest to a misspelt one, or ""."""
        candidates = sorted(self._known - set(self.data))
        match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if not match:  # a case slip (Poll_Interval) is not "close" to difflib
            match = [k for k in candidates if k.lower() == key.lower()][:1]
        return f" (did you mean {match[0]}?)" if match else ""

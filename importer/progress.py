"""What an import reports: the summary line at the end, and progress while it runs.

Strategy: ``ImportSummary`` adds up what committed batches changed (a daemon starts a fresh
one every cycle, so it never grows); ``Progress`` rewrites one line on a terminal four times a
second, or prints a line every ten seconds to a log-like stream, and never stops an import
when its stream breaks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TextIO

from store.model import BatchResult


MAX_CRL_OUTCOMES = 8  # CRLs named in the summary line; the log names every one


@dataclass
class ImportSummary:
    """Totals of one import run; ``line()`` is the summary printed at the end."""

    files: int = 0
    accepted: int = 0
    unchanged: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    certs_new: int = 0
    certs_updated: int = 0
    certs_unchanged: int = 0
    revocations: int = 0
    releases: int = 0
    crls: int = 0
    cas: int = 0
    index_lines: int = 0
    # per CRL offered: "<CA> <scope> #<number>: <applied|unchanged|older|pending delta|…>"
    crl_outcomes: list[str] = field(default_factory=list)
    malformed_lines: int = 0
    generation: int = 0
    elapsed: float = 0.0

    @property
    def certs(self) -> int:
        return self.certs_new + self.certs_updated + self.certs_unchanged

    @property
    def rate(self) -> float:
        return self.certs / self.elapsed if self.elapsed > 0 else 0.0

    def add(self, result: BatchResult) -> None:
        """Count what a committed batch changed."""
        self.certs_new += result.certs_new
        self.certs_updated += result.certs_updated
        self.certs_unchanged += result.certs_unchanged
        self.revocations += result.revoked
        self.releases += result.released
        self.crls += result.crls
        self.cas += result.cas
        if result.generation is not None:
            self.generation = int(result.generation)

    def line(self) -> str:
        """One line: files, certificates, revocations, CRLs, generation, time and rate."""
        parts = [
            (f"files {self.files} (accepted {self.accepted}, rejected {len(self.rejected)},"
             f" unchanged {self.unchanged})"),
            (f"certificates {self.certs_new} new, {self.certs_updated} updated,"
             f" {self.certs_unchanged} unchanged"),
            (f"revocations {self.revocations}, releases {self.releases}, CRLs {self.crls},"
             f" CA updates {self.cas}"),
        ]
        if self.crl_outcomes:
            shown = self.crl_outcomes[:MAX_CRL_OUTCOMES]
            more = len(self.crl_outcomes) - len(shown)
            parts.append("CRL " + ", ".join(shown) + (f" and {more} more" if more else ""))
        if self.index_lines or self.malformed_lines:
            parts.append(f"index lines {self.index_lines} ({self.malformed_lines} malformed)")
        parts.append(f"generation {self.generation}")
        parts.append(f"{self.elapsed:.1f} s, {self.rate:.0f} certificates/s")
        return "import: " + "; ".join(parts)


class Progress:
    """Progress on a terminal (one rewritten line) or every few seconds in a log-like stream."""

    def __init__(self, stream: TextIO, total: int, unit: str = "files") -> None:
        self.stream = stream
        self.total = total
        self.unit = unit
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.tty else 10.0
        self.start = self._last = time.monotonic()
        self.done = 0
        self.certs = 0

    def tick(self, done: int = 0, certs: int = 0, *, force: bool = False) -> None:
        """Count progress; print when due."""
        self.done += done
        self.certs += certs
        t = time.monotonic()
        if not force and t - self._last < self.interval:
            return
        self._last = t
        rate = self.certs / (t - self.start) if t > self.start else 0.0
        text = (f"{self.done}/{self.total} {self.unit}, {self.certs} certificates,"
                f" {rate:.0f} certificates/s")
        try:
            self.stream.write(("\r" + text + "\x1b[K") if self.tty else text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not stop an import

    def finish(self) -> None:
        self.tick(force=True)
        if self.tty:
            try:
                self.stream.write("\n")
            except (OSError, ValueError):
                pass

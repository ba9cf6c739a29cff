"""One-line descriptions of unexpected errors for the command line."""

from __future__ import annotations

import os
import traceback


def describe(exc: BaseException) -> str:
    """A single line for a bug; the traceback only when CERTPUB_DEBUG=1."""
    if os.environ.get("CERTPUB_DEBUG") == "1":
        traceback.print_exception(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
    return (f"internal error: {type(exc).__name__}: {exc}{place}"
            " (set CERTPUB_DEBUG=1 for the traceback; please report it)")

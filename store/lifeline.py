"""A child process that must not outlive its parent: ``die_with_parent``.

Strategy: a leaf module (standard library only) at the bottom layer, so the server's worker
supervisor and signing processes and the importer's worker pool share one copy without the
importer importing ``server`` or the signing process importing the 500-line supervisor. It is
here, not in ``server/``, only because ``store/`` is the one package every other imports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHANED = 75  # EX_TEMPFAIL: the exit code of a child whose parent died before it was set up


def die_with_parent(parent: int) -> None:
    """Make this (forked) process end when the process parent dies; end it now if it already has.

    SIGKILL, not SIGTERM: with the parent gone nobody would escalate a graceful stop that hangs
    (say a store thread blocked on an unreachable database), and a child writes nothing that a
    kill could leave half done. Elsewhere than Linux only the immediate check is made. The check
    after ``prctl`` closes the race of a parent killed between ``fork()`` and the ``prctl()``.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent:
        os._exit(ORPHANED)

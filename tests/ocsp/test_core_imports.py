"""The OCSP core imports no Twisted: only the signing package (its queue, pacer, executors and
the signing processes' driver) and the signing process itself do."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OCSP = ROOT / "server" / "ocsp"
# the signing package drives Deferreds, the reactor and child processes; signworker is the
# child process itself (it forwards its log events through twisted.logger)
ALLOWED = {OCSP / "signworker.py"}


def test_importing_the_service_imports_no_twisted() -> None:
    code = ("import sys, server.ocsp.service, server.ocsp.cache, server.ocsp.codec, "
            "server.ocsp.der, server.ocsp.responder, server.ocsp.requestor, "
            "server.ocsp.signer, server.ocsp.publish, server.ocsp.config, server.ocsp.outcome\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_of_the_core_imports_twisted() -> None:
    offenders = []
    for path in sorted(OCSP.glob("*.py")):
        if path in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "twisted"]
    assert offenders == []

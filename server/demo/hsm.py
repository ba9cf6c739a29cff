"""A SoftHSM2 token of its own for the demo (``certpub demo --hsm``), the tests and the benchmark.

Strategy: everything through SoftHSM2's own tool, as an operator would do it (docs/hsm.md, the
SoftHSM2 steps): a folder with a ``softhsm2.conf`` naming a token folder beside it (the library
finds it through the ``SOFTHSM2_CONF`` environment variable), ``softhsm2-util --init-token``,
then ``softhsm2-util --import`` of each OCSP signer key (imported keys are sensitive and not
extractable), after which the key file is deleted and the configuration names the key by its
PKCS#11 URI. The user PIN goes to an owner-only file referenced by ``[pkcs11] pin_file``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Where distributions put SoftHSM2's PKCS#11 library (Debian first).
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class SoftHsmMissing(RuntimeError):
    """SoftHSM2 (softhsm2-util or its library) is not installed."""


def softhsm_module() -> Path | None:
    """The SoftHSM2 PKCS#11 library on this machine, or None."""
    for candidate in SOFTHSM_MODULES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def softhsm_util() -> str | None:
    return shutil.which("softhsm2-util")


@dataclass(frozen=True)
class SoftHsmToken:
    """One initialised token in a folder of its own."""

    folder: Path
    conf: Path  # SOFTHSM2_CONF for every process using the token
    tokens_dir: Path
    label: str
    module: Path
    pin_file: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def util(self, *args: str) -> subprocess.CompletedProcess[str]:
        tool = softhsm_util()
        if tool is None:
            raise SoftHsmMissing("softhsm2-util is not installed (apt-get install softhsm2)")
        result = subprocess.run([tool, *args], capture_output=True, text=True, env=self.env(),
                                timeout=60, check=False)
        if result.returncode != 0:
            pin = self.pin_file.read_text().strip() if self.pin_file.exists() else ""
            out = (result.stderr or result.stdout).replace(pin, "****") if pin else result.stderr
            raise RuntimeError(f"softhsm2-util {args[0]} failed: {out.strip()}")
        return result

    def import_key(self, key_path: Path, label: str, key_id: bytes) -> str:
        """Import a PKCS#8 PEM key as a sensitive, non-extractable object; its pkcs11: URI."""
        self.util("--import", str(key_path), "--token", self.label, "--label", label,
                  "--id", key_id.hex(), "--pin", self.pin_file.read_text().strip())
        return f"pkcs11:token={self.label};object={label}"


def create_token(folder: Path, label: str = "certpub", pin: str | None = None) -> SoftHsmToken:
    """A fresh SoftHSM2 token in folder (its conf, its token directory, an owner-only PIN file)."""
    module = softhsm_module()
    if module is None or softhsm_util() is None:
        raise SoftHsmMissing("SoftHSM2 is not installed (apt-get install softhsm2)")
    folder.mkdir(parents=True, exist_ok=True)
    tokens = folder / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    pin_file = folder / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, ((pin or secrets.token_hex(8)) + "\n").encode())
    finally:
        os.close(fd)
    token = SoftHsmToken(folder, conf, tokens, label, module, pin_file)
    token.util("--init-token", "--free", "--label", label, "--so-pin", secrets.token_hex(8),
               "--pin", pin_file.read_text().strip())
    return token


def _toml(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def move_signer_keys(config_path: Path, token: SoftHsmToken, *, delete: bool = True,
                     out: Path | None = None) -> dict[str, str]:
    """Move every file ``signer_key`` of the configuration into the token: import it, delete
    the file (unless not ``delete``), name it by URI, and add the ``[pkcs11]`` table (written
    to ``out``, default the same file). Returns URI by key file."""
    text = config_path.read_text()
    moved: dict[str, str] = {}
    pattern = re.compile(r'^signer_key = "([^"]+)"$', re.MULTILINE)
    for n, match in enumerate(pattern.finditer(text), start=1):
        path = Path(match.group(1))
        label = path.stem  # e.g. rsa-ca-ocsp
        moved[str(path)] = token.import_key(path, label, bytes([n]))
    for path_text, uri in moved.items():
        text = text.replace(f'signer_key = "{path_text}"', f'signer_key = "{uri}"')
        if delete:
            Path(path_text).unlink()
    text += ("\n# The OCSP signer keys live in a SoftHSM2 token (certpub demo --hsm); the library"
             "\n# finds the token through SOFTHSM2_CONF=" + str(token.conf) + "\n[pkcs11]\n"
             f"module = {_toml(token.module)}\npin_file = {_toml(token.pin_file)}\n")
    (out or config_path).write_text(text)
    return moved

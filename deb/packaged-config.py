"""Print /etc/certpub/certpub.toml as the package ships it: the documented example with every
setting commented out (``#key = ...``, ``#[table]``), so nothing is served until it is edited.

Removing the leading ``#`` of a line gives back the example's line; the comments that explain
each key are kept as they are. ``certpub check-config`` on the untouched file says what to
configure and exits 78.
"""

from __future__ import annotations

import sys

HEADER = """\
# /etc/certpub/certpub.toml: certpub's configuration, as the Debian package installs it.
#
# Nothing is served until this file is edited: every setting below is commented out. Remove
# the leading "#" of the lines you need (at least one [[ca]] with its certificate, the OCSP
# signer of each CA that answers OCSP, the [ldap] and [http] listeners), then:
#   certpub check-config                                  # names any wrong key, exits 0 when good
#   systemctl enable --now certpub certpub-importd        # the units are installed disabled
# The same example, uncommented: /usr/share/doc/certpub/certpub.example.toml.
# Files the server reads (CA certificates, keys) must be readable by the certpub user; keys
# by it alone (chown certpub:certpub KEY; chmod 0600 KEY).
#
"""

def comment_out(text: str) -> str:
    """Comment every line that is not already a comment or blank."""
    out = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
        else:
            out.append("#" + line)
    return "\n".join(out) + "\n"


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    # The example's own first line says "Copy to /etc/certpub/certpub.toml": the header replaces it.
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    sys.stdout.write(HEADER + comment_out("\n".join(lines)))


if __name__ == "__main__":
    main(sys.argv[1])

"""The cost of the LDAP BER codec per search: certpub's own (server/ldap/codec.py) vs ldaptor's.

Usage: python bench/ldap_codec.py [-n 20000]

One search as bench/ldap_bench.py sends it — ``(mail=x)`` asking for ``userCertificate;binary``
— decoded, and its answer — one SearchResultEntry with a 600-byte certificate and the
SearchResultDone — encoded, by each codec; µs per search (process CPU time, best of 3).
ldaptor is a test dependency (pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldap_bench import message, request
from ldaptor.protocols import pureber, pureldap

from server.ldap import codec

DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)
DN = "cn=User 1,ou=Bench,o=Bench,c=MO"
CERT = bytes(range(256)) * 2 + bytes(88)


def ours(pdu: bytes) -> bytes:
    msg = codec.decode_message(pdu)
    return (codec.encode_entry(msg.message_id, DN, [("userCertificate;binary", [CERT])])
            + codec.encode_result(msg.message_id, 0x65, 0))


def ldaptors(pdu: bytes) -> bytes:
    msg, _ = pureber.berDecodeObject(DECODER, pdu)
    entry = pureldap.LDAPSearchResultEntry(objectName=DN,
                                           attributes=[("userCertificate;binary", [CERT])])
    done = pureldap.LDAPSearchResultDone(resultCode=0)
    return (pureldap.LDAPMessage(entry, id=msg.id).toWire()
            + pureldap.LDAPMessage(done, id=msg.id).toWire())


def timed(fn: Callable[[bytes], bytes], pdu: bytes, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn(pdu)
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    pdu = message(0x01000000, request("mail", 1))
    a, b = ours(pdu), ldaptors(pdu)
    assert decode_all(a) == decode_all(b), "the two codecs disagree"
    us_ours = timed(ours, pdu, args.n)
    us_ldaptor = timed(ldaptors, pdu, max(args.n // 10, 100))
    print(f"decode (mail=x) + encode entry and done: certpub {us_ours:.1f} µs, "
          f"ldaptor {us_ldaptor:.1f} µs ({us_ldaptor / us_ours:.0f}×)")


def decode_all(data: bytes) -> list[bytes]:
    out = []
    while data:
        msg, used = pureber.berDecodeObject(DECODER, data)
        out.append(msg.toWire())
        data = data[used:]
    return out


if __name__ == "__main__":
    main()

"""Writes the LDAP request vectors of this folder (see README.md).

Run from the repository root: ``.venv/bin/python tests/vectors/ldap/make_vectors.py``.
Well-formed requests are encoded by ldaptor (an encoder independent of certpub's codec);
malformed ones are written byte by byte.
"""

from __future__ import annotations

from pathlib import Path

from ldaptor import ldapfilter
from ldaptor.protocols import pureber, pureldap

HERE = Path(__file__).resolve().parent
MAIL = "s1@example.test"
SUBJECT = "cn=Subscriber 1,o=certpub tests,c=MO"
PAGED = b"1.2.840.113556.1.4.319"


def search(text: str, base: str = "c=MO", scope: int = 2, attrs: tuple[str, ...] = (),
           size: int = 0, types_only: bool = False, mid: int = 1, controls: object = None) -> bytes:
    req = pureldap.LDAPSearchRequest(baseObject=base, scope=scope, sizeLimit=size,
                                     filter=ldapfilter.parseFilter(text), attributes=list(attrs),
                                     typesOnly=types_only)
    return pureldap.LDAPMessage(req, id=mid, controls=controls).toWire()


def paged(size: int, cookie: bytes) -> bytes:
    value = pureber.BERSequence([pureber.BERInteger(size), pureber.BEROctetString(cookie)])
    return value.toWire()


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(body))) + body + content


def deep_not(depth: int) -> bytes:
    inner = tlv(0x87, b"objectClass")
    for _ in range(depth):
        inner = tlv(0xA2, inner)
    op = tlv(0x63, tlv(0x04, b"c=MO") + b"\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00"
             b"\x01\x01\x00" + inner + tlv(0x30, b""))
    return tlv(0x30, b"\x02\x01\x01" + op)


VECTORS: dict[str, bytes] = {
    "search-mail.ber": search(f"(mail={MAIL})", attrs=("userCertificate;binary",)),
    "search-mail-respelled.ber": search(f"(mail={MAIL})", base="C=mo",
                                        attrs=("USERCERTIFICATE;BINARY",)),
    "search-base-subject.ber": search("(objectClass=*)", base=SUBJECT, scope=0,
                                      attrs=("userCertificate;binary",
                                             "cACertificate;binary",
                                             "certificateRevocationList;binary")),
    "search-size-1.ber": search("(cn=Subscriber*)", size=1, attrs=("1.1",)),
    "search-types-only.ber": search(f"(mail={MAIL})", types_only=True),
    "search-paged-2.ber": search("(cn=Subscriber*)", attrs=("1.1",),
                                 controls=[(PAGED, False, paged(2, b""))]),
    "search-paged-bad-cookie.ber": search("(cn=Subscriber*)", attrs=("1.1",),
                                          controls=[(PAGED, False, paged(2, b"forged"))]),
    "search-private-attr.ber": search("(serialNumber=1)", attrs=("*",)),
    "search-msgid-max.ber": search(f"(mail={MAIL})", mid=2**31 - 1),
    "search-critical-unknown-control.ber": search(
        f"(mail={MAIL})", controls=[(b"1.2.3.4.5", True, None)]),
    "bind-anonymous.ber": pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(dn="", auth=b""), id=1).toWire(),
    "bind-password.ber": pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(dn="cn=admin", auth=b"secret"), id=1).toWire(),
    "bind-dn-no-password.ber": pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(dn="cn=admin", auth=b""), id=1).toWire(),
    "bind-sasl.ber": pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(dn="", auth=(b"EXTERNAL", None), sasl=True), id=1).toWire(),
    "bind-v2.ber": pureldap.LDAPMessage(
        pureldap.LDAPBindRequest(version=2, dn="", auth=b""), id=1).toWire(),
    "compare-mail.ber": pureldap.LDAPMessage(pureldap.LDAPCompareRequest(
        entry=SUBJECT, ava=pureldap.LDAPAttributeValueAssertion(
            pureber.BEROctetString("mail"), pureber.BEROctetString(MAIL.upper()))), id=1).toWire(),
    "compare-private.ber": pureldap.LDAPMessage(pureldap.LDAPCompareRequest(
        entry=SUBJECT, ava=pureldap.LDAPAttributeValueAssertion(
            pureber.BEROctetString("serialNumber"), pureber.BEROctetString("1"))), id=1).toWire(),
    "delete.ber": pureldap.LDAPMessage(pureldap.LDAPDelRequest(entry=SUBJECT), id=1).toWire(),
    "whoami.ber": pureldap.LDAPMessage(pureldap.LDAPExtendedRequest(
        requestName="1.3.6.1.4.1.4203.1.11.3"), id=1).toWire(),
    "starttls.ber": pureldap.LDAPMessage(pureldap.LDAPStartTLSRequest(), id=1).toWire(),
    "extended-unknown.ber": pureldap.LDAPMessage(pureldap.LDAPExtendedRequest(
        requestName="1.2.3.4"), id=1).toWire(),
    "abandon.ber": pureldap.LDAPMessage(pureldap.LDAPAbandonRequest(id=7), id=2).toWire(),
    "unbind.ber": pureldap.LDAPMessage(pureldap.LDAPUnbindRequest(), id=3).toWire(),
    # malformed: written by hand
    "bad-msgid-negative.ber": b"\x30\x05\x02\x01\xff\x42\x00",
    "msgid-nonminimal.ber": b"\x30\x06\x02\x02\x00\x01\x42\x00",
    "bad-indefinite-length.ber": b"\x30\x80\x02\x01\x01\x42\x00\x00\x00",
    "bad-trailing-bytes.ber": tlv(0x30, b"\x02\x01\x01\x42\x00\x00"),
    "bad-deep-not-101.ber": deep_not(101),
    "bad-not-ldap.ber": b"GET / HTTP/1.1\r\n\r\n",
}


def main() -> None:
    for name, data in VECTORS.items():
        (HERE / name).write_bytes(data)
    print(f"{len(VECTORS)} vectors written to {HERE}")


if __name__ == "__main__":
    main()

"""Name tables of the demo PKI: Macau subscribers, OpenSSL attribute and reason names."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier

TELEPHONE_NUMBER = ObjectIdentifier("2.5.4.20")
"""id-at-telephoneNumber, absent from cryptography's NameOID."""

OPENSSL_REASONS: dict[str, str] = {
    "unspecified": "unspecified",
    "key_compromise": "keyCompromise",
    "ca_compromise": "CACompromise",
    "affiliation_changed": "affiliationChanged",
    "superseded": "superseded",
    "cessation_of_operation": "cessationOfOperation",
    "certificate_hold": "certificateHold",
    "remove_from_crl": "removeFromCRL",
}
"""asn1crypto CRL reason names mapped to the names `openssl ca` writes into index.txt."""

OPENSSL_SHORT_NAMES: dict[ObjectIdentifier, str] = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STREET_ADDRESS: "street",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.TITLE: "title",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.POSTAL_CODE: "postalCode",
    TELEPHONE_NUMBER: "telephoneNumber",
}
"""OpenSSL short names (OBJ_nid2sn) of the attributes X509_NAME_oneline prints."""

DEMO_ORGANISATION = "Autoridade de Certificação Demo 演示"

# (commonName, ASCII e-mail local part)
PEOPLE: tuple[tuple[str, str], ...] = (
    ("陳大文", "chan.taiman"),
    ("João Conceição", "joao.conceicao"),
    ("李小龍", "lei.siulung"),
    ("Maria da Graça Gonçalves", "maria.goncalves"),
    ("黃美玲", "wong.meiling"),
    ("António Simões", "antonio.simoes"),
    ("張家輝", "cheong.kafai"),
    ("Inês Magalhães", "ines.magalhaes"),
    ("梁詠琪", "leong.wingkei"),
    ("José Lourenço", "jose.lourenco"),
    ("林志明", "lam.chiming"),
    ("Ana Luísa Fonseca", "ana.fonseca"),
    ("吳嘉欣", "ng.kayan"),
    ("Luís Câmara", "luis.camara"),
    ("劉德明", "lau.takming"),
    ("Conceição Brás", "conceicao.bras"),
    ("周雅婷", "chau.ngating"),
    ("Sérgio Araújo", "sergio.araujo"),
    ("鄭國強", "cheang.kwokkeung"),
    ("Beatriz Pimentel", "beatriz.pimentel"),
    ("區麗華", "au.laiwa"),
    ("Tomás Assunção", "tomas.assuncao"),
    ("馮志偉", "fong.chiwai"),
    ("Margarida Leitão", "margarida.leitao"),
    ("蘇慧敏", "sou.waiman"),
    ("Rui Estêvão", "rui.estevao"),
    ("譚家豪", "tam.kahou"),
    ("Helena Rosário", "helena.rosario"),
    ("羅曉晴", "lo.hiuching"),
    ("Jorge Rodrigues 羅德禮", "jorge.rodrigues"),
    ("高偉傑", "kou.waikit"),
    ("Vasco Guimarães", "vasco.guimaraes"),
    ("葉嘉琪", "ip.kakei"),
    ("Cláudia Ribeiro 李嘉玲", "claudia.ribeiro"),
    ("歐陽志遠", "aueong.chiyuen"),
    ("Filipa Gusmão", "filipa.gusmao"),
    ("何文傑", "ho.mankit"),
    ("Duarte Sequeira", "duarte.sequeira"),
    ("麥淑儀", "mak.sokyi"),
    ("Leonor Brandão", "leonor.brandao"),
    ("郭子健", "kuok.chikin"),
    ("Gonçalo Saraiva", "goncalo.saraiva"),
    ("崔綺雯", "choi.ieiman"),
    ("Matilde Cabral", "matilde.cabral"),
    ("謝永康", "che.winghong"),
    ("Henrique Lobo", "henrique.lobo"),
    ("潘詠珊", "pun.wingsan"),
    ("Teresa Vilaça", "teresa.vilaca"),
    ("曾國華", "chang.kwokwa"),
    ("Nuno Falcão", "nuno.falcao"),
)

# (organizationName, organizationalUnitName or None, e-mail domain)
ORGANISATIONS: tuple[tuple[str, str | None, str], ...] = (
    ("Companhia de Electricidade de Macau", "Informática", "cem.example.mo"),
    ("Direcção dos Serviços de Finanças", "Divisão de Informática", "dsf.example.mo"),
    ("澳門大學", "資訊及通訊科技辦公室", "um.example.mo"),
    ("Banco Nacional Ultramarino, S.A.", "Operações", "bnu.example.mo"),
    ("澳門特別行政區政府", "行政公職局", "gov.example.mo"),
    ("Universidade de São José", "Faculdade de Ciências", "usj.example.mo"),
    ("Associação dos Macaenses", None, "adm.example.mo"),
    ("Santa Casa da Misericórdia de Macau", "Secretaria", "scm.example.mo"),
)


def ca_name(common_name: str) -> x509.Name:
    """Return the subject of a demo CA with the given common name."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "MO"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEMO_ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def has_private_attributes(index: int) -> bool:
    """Tell whether subscriber `index` carries attributes that must not be published."""
    return index % 7 == 3


def subscriber_identity(index: int) -> tuple[x509.Name, tuple[str, ...]]:
    """Return the deterministic subject and SAN e-mails of subscriber number `index`."""
    cn, local = PEOPLE[index % len(PEOPLE)]
    lap = index // len(PEOPLE)
    if lap:
        cn, local = f"{cn} {lap + 1}", f"{local}{lap + 1}"
    org, unit, domain = ORGANISATIONS[index % len(ORGANISATIONS)]
    emails: tuple[str, ...] = (f"{local}@{domain}",)
    if index % 5 == 2:
        emails += (f"{local}@mail.example.mo",)
    private = has_private_attributes(index)
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "MO")]
    if private:
        attrs.append(x509.NameAttribute(NameOID.LOCALITY_NAME, "澳門"))
        attrs.append(
            x509.NameAttribute(NameOID.STREET_ADDRESS, f"Avenida de Almeida Ribeiro, {index + 10}")
        )
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if private:
        attrs.append(
            x509.NameAttribute(
                NameOID.SERIAL_NUMBER, f"ID-{1234567 + index * 7919:07d}({index % 10})"
            )
        )
        attrs.append(
            x509.NameAttribute(
                TELEPHONE_NUMBER, f"+853 2833 {1000 + index:04d}", _type=_ASN1Type.PrintableString
            )
        )
    if index % 3 != 1:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, emails[0]))
    return x509.Name(attrs), emails

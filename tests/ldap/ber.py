"""Reading what the server wrote with ldaptor's decoder, the reference codec of the tests."""

from __future__ import annotations

from typing import Any

from ldaptor.protocols import pureber, pureldap

DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
    )
)


def decode(data: bytes) -> list[Any]:
    """Every LDAPMessage in data, in order (data must hold whole messages only)."""
    out = []
    while data:
        msg, used = pureber.berDecodeObject(DECODER, data)
        assert msg is not None, data
        out.append(msg)
        data = data[used:]
    return out


def written(clock: Any, transport: Any) -> list[Any]:
    """The messages a protocol on ``transport`` wrote once its ``clock`` has nothing due
    (searches run their steps as delayed calls), read and cleared."""
    for _ in range(10_000):
        if not clock.getDelayedCalls():
            break
        clock.advance(0)
    out = transport.value()
    transport.clear()
    return decode(out)

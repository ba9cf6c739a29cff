"""LDAP result codes (RFC 4511 §4.1.9) and the one exception tree that carries them."""

from __future__ import annotations

import enum


class ResultCode(enum.IntEnum):
    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    TIME_LIMIT_EXCEEDED = 3
    SIZE_LIMIT_EXCEEDED = 4
    COMPARE_FALSE = 5
    COMPARE_TRUE = 6
    AUTH_METHOD_NOT_SUPPORTED = 7
    ADMIN_LIMIT_EXCEEDED = 11
    UNAVAILABLE_CRITICAL_EXTENSION = 12
    NO_SUCH_ATTRIBUTE = 16
    UNDEFINED_ATTRIBUTE_TYPE = 17
    INAPPROPRIATE_MATCHING = 18
    INVALID_ATTRIBUTE_SYNTAX = 21
    NO_SUCH_OBJECT = 32
    INVALID_DN_SYNTAX = 34
    INVALID_CREDENTIALS = 49
    BUSY = 51
    UNAVAILABLE = 52
    UNWILLING_TO_PERFORM = 53
    OTHER = 80


class LdapError(Exception):
    """An operation that ends with a result code other than success."""

    code: ResultCode = ResultCode.OTHER

    def __init__(self, message: str = "", matched: str = "", code: ResultCode | None = None):
        super().__init__(message)
        self.message = message
        self.matched = matched
        if code is not None:
            self.code = code


class ProtocolError(LdapError):
    """Input that is not LDAP: answered with a Notice of Disconnection, then closed."""

    code = ResultCode.PROTOCOL_ERROR


class NoSuchObject(LdapError):
    code = ResultCode.NO_SUCH_OBJECT


class InvalidDN(LdapError):
    code = ResultCode.INVALID_DN_SYNTAX


class AdminLimitExceeded(LdapError):
    code = ResultCode.ADMIN_LIMIT_EXCEEDED


class Unavailable(LdapError):
    """The store cannot be read (the operation may succeed later)."""

    code = ResultCode.UNAVAILABLE

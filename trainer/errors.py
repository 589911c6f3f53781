"""The project's one error type.

Every failure the library reports on purpose is a :class:`BnnError` with an
:class:`ErrorCode`. The service maps codes to HTTP statuses in one table; the
command line prints ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

__all__ = ["BnnError", "ErrorCode"]


class ErrorCode(StrEnum):
    """What kind of failure an error is; each maps to one HTTP status."""

    INVALID_ARGUMENT = "invalid_argument"  # 422: a value the caller gave is wrong
    NOT_FOUND = "not_found"  # 404: unknown run, epoch, layer or dataset file
    CONFLICT = "conflict"  # 409: impossible state change, duplicate epoch with other content
    CORRUPT = "corrupt"  # 500-class for the data, but reported, never crashes a reader
    STORAGE = "storage"  # data directory or database cannot be used
    UNAVAILABLE = "unavailable"  # an optional resource (network, dataset files) is missing


class BnnError(Exception):
    """An error with a code, a message naming the bad value, and optional details."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"BnnError({self.code.value!r}, {self.message!r})"

    @classmethod
    def invalid(cls, message: str, **details: Any) -> BnnError:
        return cls(ErrorCode.INVALID_ARGUMENT, message, **details)

    @classmethod
    def not_found(cls, message: str, **details: Any) -> BnnError:
        return cls(ErrorCode.NOT_FOUND, message, **details)

"""The one error type of the public API."""

from __future__ import annotations


class HyperTransportError(ValueError):
    """Raised for input HyperTransport cannot use; the message names the value, what was expected and the fix.

    Subclasses ``ValueError`` so callers that already catch bad values keep working.
    """


def describe_mismatch(what: str, expected: object, found: object, fix: str) -> str:
    """One uniform message: ``<what>: expected <expected>, found <found>. Fix: <fix>``."""
    return f"{what}: expected {expected}, found {found}. Fix: {fix}"

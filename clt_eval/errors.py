"""User-facing errors.

Every problem a user can cause (a bad name, a bad file, a bad number) is raised as a
``CltEvalError`` with a one-line message naming the field, file or tensor and what was
expected. The CLI turns it into that one line and exit code 2.
"""

from __future__ import annotations


class CltEvalError(ValueError):
    """A problem with user input, reported as one line."""


def require(condition: bool, message: str) -> None:
    """Raise ``CltEvalError(message)`` unless ``condition`` holds."""
    if not condition:
        raise CltEvalError(message)


def check_choice(field: str, value: object, allowed: tuple) -> None:
    """Fail with a message naming ``field`` and listing the allowed values."""
    if value not in allowed:
        raise CltEvalError(f"{field}={value!r} is not one of {', '.join(map(repr, allowed))}")


def check_finite_nonneg(field: str, value: float) -> None:
    """Fail unless ``value`` is a finite number >= 0 (NaN, inf and negatives are rejected)."""
    ok = isinstance(value, int | float) and value == value and value >= 0 and value != float("inf")
    if not ok:
        raise CltEvalError(f"{field}={value!r}: expected a finite number >= 0")

"""Constructor argument checks with torchmetrics-style messages: what was expected, what came in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_choice(argument: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``.

    Examples:
        >>> check_choice("on_violation", "warn", ("warn", "error"))
        'warn'
    """
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Expected argument `{argument}` to be one of {allowed}, but got {value!r}.")
    return value


def check_bool(argument: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``, else raise ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(
            f"Expected argument `{argument}` to be a bool, but got {value!r} of type {type(value).__name__}."
        )
    return value


def check_int(argument: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Expected argument `{argument}` to be an integer >= {minimum}, "
            f"but got {value!r} of type {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"Expected argument `{argument}` to be an integer >= {minimum}, but got {value!r}.")
    return value


def check_float(argument: str, value: Any, minimum: float, maximum: float | None = None) -> float:
    """Return ``value`` as a float if it is a finite real number in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Expected argument `{argument}` to be a number, but got {value!r} of type {type(value).__name__}."
        )
    number = float(value)
    upper = "" if maximum is None else f" and <= {maximum}"
    if (
        number != number
        or number < minimum
        or (maximum is not None and number > maximum)
        or number
        in (
            float("inf"),
            float("-inf"),
        )
    ):
        raise ValueError(
            f"Expected argument `{argument}` to be a finite number >= {minimum}{upper}, but got {value!r}."
        )
    return number

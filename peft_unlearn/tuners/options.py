"""Type checks the method configs share: a count given as 2.5 or a rate given as "0.1" failed only when editing,
with an error that named no option."""

from __future__ import annotations

from collections.abc import Iterable


def check_integers(config: object, names: Iterable[str]) -> None:
    """Refuse any of ``config``'s ``names`` that is not an ``int`` (a bool or a float is not one)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")


def check_numbers(config: object, names: Iterable[str]) -> None:
    """Refuse any of ``config``'s ``names`` that is not an ``int`` or ``float`` (a bool or a string is not one)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")

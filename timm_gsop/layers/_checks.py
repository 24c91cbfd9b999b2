"""Argument checks that name the argument: a ValueError a user can act on, not a torch-internal message."""
from typing import Any

__all__ = ['check_positive_int']


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an integer >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')

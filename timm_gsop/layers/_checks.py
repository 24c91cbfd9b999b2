"""Argument checks that name the argument: a ValueError a user can act on, not a torch-internal message."""
from typing import Any, Optional

__all__ = ['check_int']


def check_int(name: str, value: Any, low: int = 1, high: Optional[int] = None, why: str = '') -> None:
    """Raise a ValueError naming the argument unless ``value`` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f'an integer in [{low}, {high}]{why}' if high is not None else \
            'a positive integer' if low == 1 else f'an integer >= {low}'
        raise ValueError(f'{name} must be {bounds}, got {value!r}')

"""The one check of a number read from a message, a reply or a config: a finite int or
float (a bool is not a number here) within a range."""

from __future__ import annotations

import math
from typing import Any


def is_number_in(value: Any, low: float = -math.inf, high: float = math.inf, *, above_low: bool = False) -> bool:
    """Whether `value` is a finite int or float (not a bool) in [low, high], or in (low, high]
    with `above_low`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (value > low if above_low else value >= low) and value <= high

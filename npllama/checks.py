"""The one test of "an integer, not a bool" (and of "a number, not a bool").

Python's bool is an int (``True == 1``, ``isinstance(True, int)``), so a size, a seed or a config
value written as ``true`` would pass for 1; npllama refuses it instead. NumPy's integers and floats
count (an id or a size taken from an array); NumPy's bool does not.
"""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (an integer or a float, Python or NumPy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

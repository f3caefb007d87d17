"""What the NumPy-only spec tests (tests/test_spec_*.py) share: the norm-relative error, the
tolerance per dtype, a rounding written from its definition, and Hypothesis's seeds.

Nothing here imports torch or computes an op: each test module writes its op's formula itself.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from npllama.tolerances import SPEC_VS_FORMULA_RTOL

seeds = st.integers(0, 2**32 - 1)
float_dtypes = st.sampled_from([np.float64, np.float32])


def rel_err(a, b) -> float:
    """max|a - b| / max|b| in float64 (npllama/tolerances.py: norm-relative)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max() if b.size else 0.0
    diff = np.abs(a - b).max() if a.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(got: np.ndarray, want, dtype) -> None:
    """got (the op, in dtype) against want (the formula, float64) within the dtype's tolerance."""
    err, rtol = rel_err(got, want), SPEC_VS_FORMULA_RTOL[np.dtype(dtype)]
    assert err <= rtol, f"{np.dtype(dtype)}: norm-relative error {err:.3e} > {rtol:.0e}"


def places(v: float, bits: int) -> float:
    """v in units of the last place of a float with ``bits`` significant bits (in v's binade)."""
    return math.frexp(v)[0] * 2 ** bits


def round_to_bits(v: float, bits: int) -> float:
    """v rounded to ``bits`` significant bits, ties to even (Python's round): float16 has 11,
    bfloat16 8. Normal range only."""
    return 0.0 if v == 0 else round(places(v, bits)) * 2.0 ** (math.frexp(v)[1] - bits)

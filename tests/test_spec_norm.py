"""RMSNorm against its formula (npllama/norm.py), NumPy only.

    y_i = x_i / sqrt(mean_j(x_j^2) + eps) * g_i      (Zhang & Sennrich 2019, eq. 4)

computed here row by row on Python floats (math.fsum, math.sqrt), apart from the implementation.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from npllama.norm import rms_norm
from spec_formulas import assert_close, float_dtypes, places, round_to_bits, seeds


def rms_norm_formula(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """x: (..., dim), g: (dim,) -> the formula in float64, one row at a time."""
    gain = g.tolist()
    rows = []
    for row in x.reshape(-1, x.shape[-1]).tolist():
        rms = math.sqrt(math.fsum(v * v for v in row) / len(row) + eps)
        rows.append([v / rms * gi for v, gi in zip(row, gain)])
    return np.array(rows).reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 64)), dtype=float_dtypes,
       eps=st.sampled_from([1e-6, 1e-5, 1e-2]), scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=seeds)
def test_rms_norm_is_x_over_its_root_mean_square_times_the_gain(shape, dtype, eps, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    g = (1 + 0.2 * rng.standard_normal(shape[-1])).astype(dtype)
    out = rms_norm(x, g, eps)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rms_norm_formula(x.astype(np.float64), g.astype(np.float64), eps), dtype)


def test_eps_sits_inside_the_root():
    """A zero row gives zeros (0 / sqrt(eps)), and a constant row c gives c / sqrt(c^2 + eps)."""
    x = np.array([[0.0, 0.0, 0.0], [0.01, 0.01, 0.01]])
    out = rms_norm(x, np.ones(3), 1e-2)
    assert (out[0] == 0).all()
    assert_close(out[1], [0.01 / math.sqrt(0.01 ** 2 + 1e-2)] * 3, np.float64)


def test_float16_rounds_the_normalised_x_before_the_gain():
    """float16: x / rms is rounded to float16 first, then multiplied by the gain (Meta's and
    transformers' order). The formula here rounds by its own rule, once per step; it equals the
    op bit for bit because x / rms lies far from a rounding tie (checked: float32 arithmetic, a
    few 2**-13 places of float16 from float64's, rounds it the same way) and the product of two
    float16 numbers is exact before it is rounded. Rounding once, after the gain, differs."""
    x, gain, eps = [1.0, 2.0, 3.0, 4.0], 1.7001953125, 1e-5          # gain: 1.7 in float16
    rms = math.sqrt(math.fsum(v * v for v in x) / len(x) + eps)
    normed = [v / rms for v in x]
    assert all(abs(places(n, 11) % 1 - 0.5) > 0.01 for n in normed)                 # far from ties
    want = [round_to_bits(round_to_bits(n, 11) * gain, 11) for n in normed]
    assert want != [round_to_bits(n * gain, 11) for n in normed]                    # the order shows
    out = rms_norm(np.array([x], np.float16), np.full(4, gain, np.float16), eps)
    assert out.dtype == np.float16 and out[0].tolist() == want

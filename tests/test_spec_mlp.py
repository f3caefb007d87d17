"""The feed-forward block against its formulas (npllama/mlp.py), NumPy only.

    linear(x, W, b)  = W x + b                 W: (out, in), as nn.Linear holds it
    silu(x)          = x / (1 + exp(-x))       (Elfwing et al. 2017; the op writes it with tanh)
    feed_forward(x)  = W2 (silu(W1 x) * W3 x)  (Shazeer 2020, SwiGLU; Meta's FeedForward)

The formulas are written here on Python floats, one output at a time (math.fsum for each dot
product, math.exp), apart from the implementation.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from npllama.mlp import feed_forward, linear, silu
from npllama.tolerances import SPEC_VS_FORMULA_RTOL
from spec_formulas import assert_close, float_dtypes, seeds


def matvec(w: list[list[float]], x: list[float], b: list[float] | None) -> list[float]:
    """W x + b, each output one exactly rounded dot product."""
    return [math.fsum(wi * xi for wi, xi in zip(row, x)) + (b[o] if b else 0.0) for o, row in enumerate(w)]


def silu_formula(v: float) -> float:
    return v / (1.0 + math.exp(-v)) if v > -700 else 0.0 * v     # exp(700) is near float64's limit


def rows(x: np.ndarray) -> list[list[float]]:
    return x.astype(np.float64).reshape(-1, x.shape[-1]).tolist()


def draw(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@settings(max_examples=30, deadline=None)
@given(lead=st.tuples(st.integers(1, 3), st.integers(1, 3)), n_in=st.integers(1, 24), n_out=st.integers(1, 24),
       bias=st.booleans(), dtype=float_dtypes, seed=seeds)
def test_linear_is_w_times_x_plus_b_with_w_out_by_in(lead, n_in, n_out, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x, w = draw(rng, (*lead, n_in), dtype), draw(rng, (n_out, n_in), dtype, 1 / math.sqrt(n_in))
    b = draw(rng, n_out, dtype) if bias else None
    out = linear(x, w, b)
    assert out.shape == (*lead, n_out) and out.dtype == dtype
    want = [matvec(w.astype(np.float64).tolist(), row, None if b is None else b.astype(np.float64).tolist())
            for row in rows(x)]
    assert_close(out, np.array(want).reshape(out.shape), dtype)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), scale=st.sampled_from([0.1, 3.0, 30.0]), dtype=float_dtypes, seed=seeds)
def test_silu_is_x_times_the_logistic_sigmoid(n, scale, dtype, seed):
    """Held relative to the largest |x|: the op's sigmoid, (1 + tanh(x / 2)) / 2, is exact to a few
    ulps of 1, not of its own size, so far below zero (x = -30: sigmoid 1e-13) only its absolute
    error is small, a few ulps of |x| in silu."""
    x = draw(np.random.default_rng(seed), n, dtype, scale)
    out = silu(x)
    assert out.dtype == dtype
    want = np.array([silu_formula(v) for v in x.astype(np.float64).tolist()])
    err, rtol = float(np.abs(out - want).max()), SPEC_VS_FORMULA_RTOL[np.dtype(dtype)]
    assert err <= rtol * float(np.abs(x.astype(np.float64)).max()), f"{err:.3e}"


def test_silu_saturates_without_overflow_or_nan():
    """Far below zero silu is 0 (exp(-x) would overflow float32 at x < -88), far above it is x; no
    floating-point exception is raised on the way."""
    for dtype, low in ((np.float16, -6e4), (np.float32, -1e30), (np.float64, -1e300)):
        x = np.array([low, -100.0, 0.0, 100.0], dtype)
        with np.errstate(all="raise"):
            out = silu(x)
        assert out[0] == 0 and out[2] == 0 and out[3] == 100
        assert abs(float(out[1]) - silu_formula(-100.0)) < 1e-40          # -3.7e-42, or 0


@settings(max_examples=30, deadline=None)
@given(lead=st.tuples(st.integers(1, 2), st.integers(1, 4)), dim=st.integers(1, 16), hidden=st.integers(1, 24),
       bias=st.booleans(), dtype=float_dtypes, seed=seeds)
def test_feed_forward_is_w2_of_silu_w1x_times_w3x(lead, dim, hidden, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = draw(rng, (*lead, dim), dtype)
    w1, w3 = (draw(rng, (hidden, dim), dtype, 1 / math.sqrt(dim)) for _ in range(2))      # (out, in)
    w2 = draw(rng, (dim, hidden), dtype, 1 / math.sqrt(hidden))
    b1, b2, b3 = ((draw(rng, n, dtype, 0.1) for n in (hidden, dim, hidden)) if bias else (None, None, None))
    out = feed_forward(x, w1, w2, w3, b1, b2, b3)
    assert out.shape == x.shape and out.dtype == dtype

    def as_lists(*arrays):
        return [None if a is None else a.astype(np.float64).tolist() for a in arrays]
    w1l, w2l, w3l, b1l, b2l, b3l = as_lists(w1, w2, w3, b1, b2, b3)
    want = []
    for row in rows(x):
        gate = [silu_formula(v) for v in matvec(w1l, row, b1l)]
        up = matvec(w3l, row, b3l)
        want.append(matvec(w2l, [g * u for g, u in zip(gate, up)], b2l))
    assert_close(out, np.array(want).reshape(out.shape), dtype)

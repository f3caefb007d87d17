"""Rotary embeddings against their definition (npllama/rope.py), NumPy only.

RoFormer (Su et al. 2021, eq. 15-16) rotates each pair of channels of a query or key at position m
by the angle m theta_i, theta_i = base ** (-2i / d): the pair as a complex number z_i, multiplied
by e^{i m theta_i}. npllama pairs channel i with channel i + d/2 (the half layout), so here

    z_i = x_i + 1j x_{i + d/2},     z_i' = z_i * cmath.exp(1j * m * theta_i)

on Python complex numbers, channel by channel, apart from the implementation (which writes the
same product as x cos + rotate_half(x) sin). Channels past rotary_dim pass through.
"""

from __future__ import annotations

import cmath

import numpy as np
from hypothesis import given, settings, strategies as st

from npllama.rope import apply_rotary_emb, default_inv_freq, rope_cos_sin, rotate_half
from npllama.tolerances import SPEC_VS_FORMULA_RTOL
from spec_formulas import assert_close, float_dtypes, seeds


def theta(base: float, d: int) -> list[float]:
    return [base ** (-2 * i / d) for i in range(d // 2)]


def rotate_formula(x: np.ndarray, positions, base: float, rotary_dim: int, scaling: float = 1.0) -> np.ndarray:
    """x: (batch, heads, seq, head_dim); positions: (seq,) or (batch, seq) -> x rotated, float64."""
    b, h, seq, head_dim = x.shape
    pos = np.broadcast_to(np.asarray(positions), (b, seq)).tolist()
    half, freqs = rotary_dim // 2, theta(base, rotary_dim)
    out = x.astype(np.float64).tolist()
    for r in range(b):
        for head in range(h):
            for t in range(seq):
                row = out[r][head][t]
                for i in range(half):
                    z = complex(row[i], row[i + half]) * cmath.exp(1j * pos[r][t] * freqs[i]) * scaling
                    row[i], row[i + half] = z.real, z.imag
    return np.array(out)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 64).map(lambda n: 2 * n), base=st.sampled_from([10.0, 1e4, 5e5]))
def test_default_frequencies_are_base_to_the_minus_2i_over_d(d, base):
    assert_close(default_inv_freq(base, d), theta(base, d), np.float64)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6)), half=st.integers(1, 8),
       passed=st.integers(0, 4), start=st.integers(0, 5000), base=st.sampled_from([1e4, 5e5]),
       scaling=st.sampled_from([1.0, 1.3]), per_row=st.booleans(), dtype=float_dtypes, seed=seeds)
def test_rotation_is_complex_multiplication_of_channel_pairs(shape, half, passed, start, base, scaling, per_row,
                                                             dtype, seed):
    """Whole heads and partial rotary (the last ``passed`` channels untouched), one position list
    for all rows or one per row, and the attention scaling YaRN puts on cos and sin."""
    b, h, seq = shape
    rotary_dim = 2 * half
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, seq, rotary_dim + passed)).astype(dtype)
    positions = start + np.arange(seq) + (np.arange(b)[:, None] * 7 if per_row else 0)   # (seq,) or (batch, seq)
    cos, sin = rope_cos_sin(default_inv_freq(base, rotary_dim), positions, scaling, dtype)
    if per_row:
        cos, sin = cos[:, None], sin[:, None]                          # (batch, 1, seq, rotary_dim)
    out = apply_rotary_emb(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, rotate_formula(x, positions, base, rotary_dim, scaling), dtype)


@settings(max_examples=30, deadline=None)
@given(half=st.integers(1, 16), m=st.integers(0, 1000), n=st.integers(0, 1000), shift=st.integers(0, 1000),
       seed=seeds)
def test_scores_depend_on_the_distance_only(half, m, n, shift, seed):
    """q_m . k_n = q_{m+s} . k_{n+s}: what rotary embeddings are for (RoFormer, eq. 11-13). Held
    norm-relative to |q| |k|, the largest a score can be (float64 angles up to 3000 theta err by
    ~3e-13 radians)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, 2 * half))
    inv_freq = default_inv_freq(1e4, 2 * half)

    def score(i, j):
        cq, sq = rope_cos_sin(inv_freq, np.array([i]), dtype=np.float64)
        ck, sk = rope_cos_sin(inv_freq, np.array([j]), dtype=np.float64)
        return float((apply_rotary_emb(q, cq, sq) * apply_rotary_emb(k, ck, sk)).sum())
    largest = float(np.linalg.norm(q) * np.linalg.norm(k))
    assert abs(score(m, n) - score(m + shift, n + shift)) <= SPEC_VS_FORMULA_RTOL[np.dtype(np.float64)] * largest


@settings(max_examples=20, deadline=None)
@given(half=st.integers(1, 16), seed=seeds)
def test_rotate_half_is_multiplication_by_i(half, seed):
    x = np.random.default_rng(seed).standard_normal(2 * half)
    z = [complex(x[i], x[i + half]) * 1j for i in range(half)]
    assert rotate_half(x).tolist() == [v.real for v in z] + [v.imag for v in z]

"""Attention against its formula (npllama/attention.py), NumPy only.

For query i of head h, with kv head g = h // n_rep (grouped-query attention, Ainslie et al. 2023):

    s_j   = q . k_j / sqrt(d)                    over the keys j query i may see:
                                                 j <= kv_len - q_len + i (causal), and not padding
    out_i = sum_j softmax(s)_j v_j               (Vaswani et al. 2017, eq. 1); no key seen: zeros

written here on Python floats, one query at a time (math.fsum, math.exp). Both implementations,
the naive one and the blockwise (flash) one with any tile sizes, must give it; and the
blockwise one's log-sum-exp is log sum_j exp(s_j).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from npllama.attention import causal_mask, flash_attention, naive_attention, repeat_kv, softmax
from npllama.tolerances import ATTENTION_LSE_RTOL
from spec_formulas import assert_close, float_dtypes, seeds


def attention_formula(q, k, v, causal: bool, kv_mask) -> tuple[np.ndarray, np.ndarray]:
    """q: (batch, n_heads, q_len, d); k, v: (batch, n_kv_heads, kv_len, d); kv_mask: (batch, kv_len)
    or None -> out (batch, n_heads, q_len, d) and lse (batch, n_heads, q_len), float64."""
    b, n_heads, q_len, d = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv
    q, k, v = (a.astype(np.float64).tolist() for a in (q, k, v))
    out = np.zeros((b, n_heads, q_len, d))
    lse = np.full((b, n_heads, q_len), -np.inf)
    for r in range(b):
        for h in range(n_heads):
            g = h // n_rep
            for i in range(q_len):
                seen = [j for j in range(kv_len) if (not causal or j <= kv_len - q_len + i)
                        and (kv_mask is None or kv_mask[r][j])]
                if not seen:
                    continue
                s = [math.fsum(a * c for a, c in zip(q[r][h][i], k[r][g][j])) / math.sqrt(d) for j in seen]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                total = math.fsum(e)
                out[r, h, i] = [math.fsum(w * v[r][g][j][c] for w, j in zip(e, seen)) / total for c in range(d)]
                lse[r, h, i] = top + math.log(total)
    return out, lse


@st.composite
def attention_cases(draw):
    b, n_kv, n_rep = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 6))
    kv_len = q_len + draw(st.integers(0, 6))                    # the queries are the last q_len slots
    d = draw(st.sampled_from([1, 4, 8]))
    rng = np.random.default_rng(draw(seeds))
    dtype = draw(float_dtypes)
    q = rng.standard_normal((b, n_kv * n_rep, q_len, d)).astype(dtype)
    k, v = rng.standard_normal((2, b, n_kv, kv_len, d)).astype(dtype)
    kv_mask = rng.random((b, kv_len)) < 0.7 if draw(st.booleans()) else None     # padding anywhere
    return q, k, v, draw(st.booleans()), kv_mask


@settings(max_examples=40, deadline=None)
@given(case=attention_cases(), block_q=st.integers(1, 7), block_k=st.integers(1, 7))
def test_naive_and_blockwise_attention_are_the_softmax_formula(case, block_q, block_k):
    q, k, v, causal, kv_mask = case
    want, want_lse = attention_formula(q, k, v, causal, kv_mask)
    naive = naive_attention(q, k, v, causal, kv_mask=kv_mask)
    flash, lse = flash_attention(q, k, v, causal, block_q, block_k, return_lse=True, kv_mask=kv_mask)
    for out in (naive, flash):
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_close(out, want, q.dtype)
    seen = np.isfinite(want_lse)
    assert (lse[~seen] == -np.inf).all() and (naive[~seen] == 0).all() and (flash[~seen] == 0).all()
    rtol = ATTENTION_LSE_RTOL[np.dtype(q.dtype)]
    assert (np.abs(lse[seen] - want_lse[seen]) <= rtol * np.maximum(1, np.abs(want_lse[seen]))).all()


@settings(max_examples=20, deadline=None)
@given(q_len=st.integers(1, 8), extra=st.integers(0, 8))
def test_causal_mask_lets_query_i_see_keys_up_to_its_own_slot(q_len, extra):
    kv_len = q_len + extra
    mask = causal_mask(q_len, kv_len)
    assert mask.tolist() == [[j <= extra + i for j in range(kv_len)] for i in range(q_len)]


@settings(max_examples=20, deadline=None)
@given(n_kv=st.integers(1, 3), n_rep=st.integers(1, 3), seed=seeds)
def test_repeat_kv_gives_query_head_h_the_kv_head_h_over_n_rep(n_kv, n_rep, seed):
    x = np.random.default_rng(seed).standard_normal((1, n_kv, 2, 3))
    out = repeat_kv(x, n_rep)
    assert out.shape == (1, n_kv * n_rep, 2, 3)
    assert all(np.array_equal(out[:, h], x[:, h // n_rep]) for h in range(n_kv * n_rep))


def test_softmax_of_a_row_with_no_visible_key_is_zeros():
    out = softmax(np.array([[-np.inf, -np.inf], [0.0, -np.inf]], np.float32))
    assert out.tolist() == [[0.0, 0.0], [1.0, 0.0]]

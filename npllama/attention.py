"""Scaled dot-product attention for MHA, GQA and MQA as one mechanism.

Grouped-query attention (Ainslie et al. 2023, "GQA") gives each key/value head to a group of
n_rep = n_heads / n_kv_heads query heads: query head h reads kv head h // n_rep. MHA is n_rep = 1,
MQA is n_kv_heads = 1. Rather than copying k and v n_rep times (Meta's ``repeat_kv``), the code
here views the queries as (batch, n_kv_heads, n_rep, ...) so that each kv head broadcasts over its
group; ``repeat_kv`` is kept to state the equivalence.

Positions. q holds the *last* q_len of the kv_len positions (decoding after a cache): query i sits
at absolute position kv_len - q_len + i and sees key j iff j <= kv_len - q_len + i.
"""

from __future__ import annotations

import numpy as np


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """(batch, n_kv_heads, kv_len, head_dim) -> (batch, n_kv_heads * n_rep, kv_len, head_dim).

    Head h of the result is kv head h // n_rep (repeat_interleave order, not tile).
    """
    return np.repeat(x, n_rep, axis=1)


def causal_mask(q_len: int, kv_len: int) -> np.ndarray:
    """Boolean (q_len, kv_len): True where query i may see key j, i.e. j <= kv_len - q_len + i."""
    offset = kv_len - q_len
    return np.arange(kv_len)[None, :] <= (np.arange(q_len)[:, None] + offset)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)): the max is subtracted for range, not for maths."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True) -> np.ndarray:
    """softmax(Q K^T / sqrt(d) + mask) V, as written in "Attention Is All You Need".

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim)
    -> (batch, n_heads, q_len, head_dim). Materialises the (q_len, kv_len) score matrix per head.
    """
    b, n_heads, q_len, d = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv_heads
    qg = q.reshape(b, n_kv_heads, n_rep * q_len, d)        # each kv head's group of queries, stacked
    scores = (qg @ np.swapaxes(k, -1, -2)) * (1.0 / np.sqrt(d)).astype(q.dtype)  # (b, n_kv, n_rep*q_len, kv_len)
    scores = scores.reshape(b, n_kv_heads, n_rep, q_len, kv_len)
    if causal and q_len > 1:                  # a single last-position query sees every key
        scores = np.where(causal_mask(q_len, kv_len), scores, -np.inf)
    probs = softmax(scores.astype(np.promote_types(q.dtype, np.float32)), axis=-1).astype(q.dtype)
    out = probs.reshape(b, n_kv_heads, n_rep * q_len, kv_len) @ v   # (b, n_kv, n_rep*q_len, d)
    return out.reshape(b, n_heads, q_len, d)

"""Scaled dot-product attention for MHA, GQA and MQA as one mechanism.

Grouped-query attention (Ainslie et al. 2023, "GQA") gives each key/value head to a group of
n_rep = n_heads / n_kv_heads query heads: query head h reads kv head h // n_rep. MHA is n_rep = 1,
MQA is n_kv_heads = 1. Rather than copying k and v n_rep times (Meta's ``repeat_kv``), the code
here views the queries as (batch, n_kv_heads, n_rep, ...) so that each kv head broadcasts over its
group; ``repeat_kv`` is kept to state the equivalence.

Two implementations compute the same function:
- ``naive_attention`` writes the (q_len, kv_len) score matrix of every head down, as the paper does;
- ``flash_attention`` (Dao et al. 2022, "FlashAttention") walks tiles of queries and keys with an
  online softmax, so its memory grows with the sequence, not with its square (docs/flash_attention.md).

Slots and padding. q holds the *last* q_len of the kv_len slots (decoding after a cache): query i
sits in slot kv_len - q_len + i and, causally, sees key j iff j <= kv_len - q_len + i. In a padded
batch, ``kv_mask`` (batch, kv_len) says which slots hold real tokens; padding is never attended.
A query that sees no key at all (padding before its row's first token) gets zeros, never NaN.
"""

from __future__ import annotations

import math

import numpy as np

from .checks import is_int
from .errors import InputError
from .layout import BLOCK_K, BLOCK_Q


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """(batch, n_kv_heads, kv_len, head_dim) -> (batch, n_kv_heads * n_rep, kv_len, head_dim).

    Head h of the result is kv head h // n_rep (repeat_interleave order, not tile).
    """
    return np.repeat(x, n_rep, axis=1)


def causal_mask(q_len: int, kv_len: int) -> np.ndarray:
    """Boolean (q_len, kv_len): True where query i may see key j, i.e. j <= kv_len - q_len + i."""
    offset = kv_len - q_len
    return np.arange(kv_len)[None, :] <= (np.arange(q_len)[:, None] + offset)


def visible_keys(q_len: int, kv_len: int, causal: bool, kv_mask: np.ndarray | None) -> np.ndarray | None:
    """Which keys each query may see, broadcastable to the grouped scores
    (batch, n_kv_heads, n_rep, q_len, kv_len); None when every query sees every key.

    causal: key j visible to query i iff j <= kv_len - q_len + i; kv_mask: (batch, kv_len), True
    where a slot holds a real token.
    """
    visible = causal_mask(q_len, kv_len) if causal and q_len > 1 else None   # a last-slot query sees all
    if kv_mask is not None:
        keys = kv_mask[:, None, None, None, :]                               # (batch, 1, 1, 1, kv_len)
        visible = keys if visible is None else visible & keys
    return visible


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)): the max is subtracted for range, not for maths.

    A row that is all -inf (every key masked) gives zeros, not NaN from -inf - -inf, as torch's
    scaled_dot_product_attention does: its max is raised to the most negative finite number, so
    exp(-inf - that) = 0 and the row sums to 0, and the sum is raised to the smallest normal
    number, so 0 / that = 0. A row with any finite entry has max > -inf and sum >= 1 (its largest
    entry contributes exp(0)), so neither floor changes it.
    """
    info = np.finfo(x.dtype)
    m = np.maximum(x.max(axis=axis, keepdims=True), info.min)
    e = np.exp(x - m)
    return e / np.maximum(e.sum(axis=axis, keepdims=True), info.tiny)


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
                    kv_mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(Q K^T / sqrt(d) + mask) V, as written in "Attention Is All You Need".

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len) bool, False for padding, or None -> (batch, n_heads, q_len, head_dim).
    Materialises the (q_len, kv_len) score matrix per head. Each query head is its own product
    against its kv head, broadcast over the group.
    """
    b, n_heads, q_len, d = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv_heads
    qg = q.reshape(b, n_kv_heads, n_rep, q_len, d)          # query heads grouped by their kv head
    kt = np.swapaxes(k, -1, -2)[:, :, None]                  # (b, n_kv, 1, d, kv_len): shared by the group
    scores = qg @ kt                                         # (b, n_kv, n_rep, q_len, kv_len)
    scores *= q.dtype.type(1.0 / math.sqrt(d))
    visible = visible_keys(q_len, kv_len, causal, kv_mask)
    if visible is not None:
        scores = np.where(visible, scores, -np.inf)
    probs = softmax(scores.astype(np.promote_types(q.dtype, np.float32), copy=False), axis=-1)
    probs = probs.astype(q.dtype, copy=False)                # float32 softmax, back to q's dtype
    out = probs @ v[:, :, None]                              # (b, n_kv, n_rep, q_len, d)
    return out.reshape(b, n_heads, q_len, d)


def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = True,
                    block_q: int = BLOCK_Q, block_k: int = BLOCK_K, return_lse: bool = False,
                    kv_mask: np.ndarray | None = None):
    """Exact attention, tile by tile, with an online softmax: the FlashAttention algorithm.

    Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
    with the loop order of Dao 2023, "FlashAttention-2" (query tiles outside, key tiles inside,
    one division at the end); the running-max softmax is Milakov & Gimelshein 2018, "Online
    normalizer calculation for softmax".

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len) bool, False for padding, or None
    -> out (batch, n_heads, q_len, head_dim), and lse (batch, n_heads, q_len) if return_lse.

    For a tile of block_q queries, the keys are read block_k at a time, and each query row keeps

        m    the largest score seen so far                     (running maximum)
        l    sum_j exp(s_j - m) over the keys seen so far      (running sum)
        acc  sum_j exp(s_j - m) v_j over the keys seen so far  (unnormalised output)

    A new tile of scores s may raise the maximum to m' = max(m, max_j s_j). Everything summed so
    far was taken relative to m; multiplying it by alpha = exp(m - m') makes it relative to m':

        l   <- alpha * l   + sum_j exp(s_j - m')
        acc <- alpha * acc + sum_j exp(s_j - m') v_j

    so after the last tile acc / l = sum_j exp(s_j) v_j / sum_j exp(s_j) = softmax(s) V, exactly
    (only rounding differs), and lse = m + log(l) = log sum_j exp(s_j). Beyond q, k, v and the
    output, memory holds one (block_q, block_k) tile of scores per head and O(q_len x head_dim)
    accumulators, never a (q_len, kv_len) matrix.

    Causal: a key tile that lies wholly after the tile's last query is never read (about half of
    the tiles when q_len == kv_len), and only tiles that cross the diagonal are masked. Padding:
    a key tile that is padding in every row is never read either (the front of a left-padded
    batch), and a tile with some padding hides it. A query that sees no key at all gets zeros and
    lse -inf. Block sizes need not divide the lengths: the last tile is simply shorter.
    """
    b, n_heads, q_len, d = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if n_heads % n_kv_heads:
        raise InputError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not is_int(size) or size < 1:
            raise InputError(f"{name} must be a positive integer, got {size!r}")
    n_rep = n_heads // n_kv_heads
    offset = kv_len - q_len                          # query i sits at absolute position offset + i
    acc_dtype = np.promote_types(q.dtype, np.float32)  # m, l, acc: float32 at least, as naive's softmax
    scale = q.dtype.type(1.0 / math.sqrt(d))
    qg = q.reshape(b, n_kv_heads, n_rep, q_len, d)   # query heads grouped by their kv head
    kt = np.swapaxes(k, -1, -2)[:, :, None]          # (b, n_kv_heads, 1, d, kv_len): shared by the group
    vg = v[:, :, None]                               # (b, n_kv_heads, 1, kv_len, d)
    out = np.empty((b, n_kv_heads, n_rep, q_len, d), q.dtype)
    lse = np.empty((b, n_kv_heads, n_rep, q_len), acc_dtype)

    for i0 in range(0, q_len, block_q):              # one tile of queries: positions offset+i0 .. offset+i1-1
        i1 = min(i0 + block_q, q_len)
        qi = qg[..., i0:i1, :]                                      # (b, n_kv, n_rep, bq, d)
        m = np.full(qi.shape[:-1] + (1,), -np.inf, acc_dtype)       # running max   (b, n_kv, n_rep, bq, 1)
        l = np.zeros_like(m)                                        # running sum   (b, n_kv, n_rep, bq, 1)
        acc = np.zeros(qi.shape, acc_dtype)                         # running p @ v (b, n_kv, n_rep, bq, d)
        # Causal skip: the tile's last query sees keys up to position offset + i1 - 1, no further.
        kv_end = min(kv_len, max(0, offset + i1)) if causal else kv_len

        for j0 in range(0, kv_end, block_k):         # one tile of keys: positions j0 .. j1-1
            j1 = min(j0 + block_k, kv_end)
            keys = None if kv_mask is None else kv_mask[:, j0:j1]  # (b, bk): real tokens of the tile
            if keys is not None and not keys.any():  # padding in every row: nothing to read
                continue
            s = qi @ kt[..., j0:j1]                                 # (b, n_kv, n_rep, bq, bk)
            s *= scale
            s = s.astype(acc_dtype, copy=False)
            if causal and j1 - 1 > offset + i0:      # the tile crosses the diagonal: hide later keys
                visible = np.arange(j0, j1)[None, :] <= np.arange(offset + i0, offset + i1)[:, None]
                s = np.where(visible, s, -np.inf)
            if keys is not None and not keys.all():  # hide the padding
                s = np.where(keys[:, None, None, None, :], s, -np.inf)
            m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
            m_ref = np.where(m_new == -np.inf, 0, m_new)            # a row with no key yet: any finite value
            alpha = np.exp(m - m_ref)                               # rescales what was summed against m
            s -= m_ref
            p = np.exp(s, out=s)                                    # exp(s_j - m'), in the scores' memory
            l *= alpha
            l += p.sum(axis=-1, keepdims=True)
            acc *= alpha
            acc += p @ vg[..., j0:j1, :]
            m = m_new

        out[..., i0:i1, :] = acc / np.where(l == 0, 1, l)           # rows that saw no key stay 0
        with np.errstate(divide="ignore"):
            lse[..., i0:i1] = (m + np.log(l))[..., 0]               # -inf where l == 0

    out = out.reshape(b, n_heads, q_len, d)
    return (out, lse.reshape(b, n_heads, q_len)) if return_lse else out

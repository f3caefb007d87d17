"""Scaled dot-product attention in Torch, the twin of npllama.attention, plus torch's fused kernel.

Same names, same shapes, same conventions as npllama.attention:
- grouped heads (GQA/MQA): query head h reads kv head h // n_rep, and k, v are never copied per
  query head (the queries are grouped by kv head instead; ``repeat_kv`` states the equivalence);
- q holds the *last* q_len of the kv_len slots: query i sees key j iff j <= kv_len - q_len + i
  ("bottom-right" causal alignment), and ``kv_mask`` (batch, kv_len) hides padding;
- a query that sees no key gets zeros (and lse -inf), never NaN.

``naive_attention`` and ``flash_attention`` are line-for-line translations of the NumPy reference,
kept readable so the parity tests compare the algorithm, not just the function.
``sdpa_attention`` is the fast path: ``torch.nn.functional.scaled_dot_product_attention``, which
dispatches to a fused flash kernel (CUDA, and CPU) when it can.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from npllama.layout import BLOCK_K, BLOCK_Q
from npllama.checks import is_int
from npllama.errors import InputError


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, n_kv_heads, kv_len, head_dim) -> (batch, n_kv_heads * n_rep, kv_len, head_dim).

    Head h of the result is kv head h // n_rep (repeat_interleave order, not tile).
    """
    return torch.repeat_interleave(x, n_rep, dim=1)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (q_len, kv_len): True where query i may see key j, i.e. j <= kv_len - q_len + i."""
    offset = kv_len - q_len
    return (torch.arange(kv_len, device=device)[None, :]
            <= (torch.arange(q_len, device=device)[:, None] + offset))


def visible_keys(q_len: int, kv_len: int, causal: bool, kv_mask: torch.Tensor | None,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """Which keys each query may see, broadcastable to the grouped scores
    (batch, n_kv_heads, n_rep, q_len, kv_len); None when every query sees every key."""
    visible = causal_mask(q_len, kv_len, device) if causal and q_len > 1 else None
    if kv_mask is not None:
        keys = torch.as_tensor(kv_mask, device=device)[:, None, None, None, :]   # (batch, 1, 1, 1, kv_len)
        visible = keys if visible is None else visible & keys
    return visible


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)); a row that is all -inf gives zeros, not NaN.

    As npllama.attention.softmax: the max is floored at the most negative finite number and the
    sum at the smallest normal one, which changes no row that has a finite entry.
    """
    info = torch.finfo(x.dtype)
    m = x.amax(dim=dim, keepdim=True).clamp_min(info.min)
    e = torch.exp(x - m)
    return e / e.sum(dim=dim, keepdim=True).clamp_min(info.tiny)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, materialising every (q_len, kv_len) score matrix.

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len) bool, False for padding, or None -> (batch, n_heads, q_len, head_dim).
    """
    b, n_heads, q_len, d = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv_heads
    qg = q.reshape(b, n_kv_heads, n_rep, q_len, d)          # query heads grouped by their kv head
    kt = k.transpose(-1, -2)[:, :, None]                     # (b, n_kv, 1, d, kv_len): shared by the group
    scores = qg @ kt                                         # (b, n_kv, n_rep, q_len, kv_len)
    scores = scores * (1.0 / math.sqrt(d))
    visible = visible_keys(q_len, kv_len, causal, kv_mask, q.device)
    if visible is not None:
        scores = torch.where(visible, scores, -math.inf)
    probs = softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).to(q.dtype)
    out = probs @ v[:, :, None]                              # (b, n_kv, n_rep, q_len, d)
    return out.reshape(b, n_heads, q_len, d)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    block_q: int = BLOCK_Q, block_k: int = BLOCK_K, return_lse: bool = False,
                    kv_mask: torch.Tensor | None = None):
    """Exact attention tile by tile with an online softmax (Dao et al. 2022, "FlashAttention").

    The algorithm of npllama.attention.flash_attention, step for step (see its docstring and
    docs/flash_attention.md): per query row a running max m, running sum l and unnormalised
    output acc; each key tile rescales them by alpha = exp(m - m') and adds its own terms.

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len) bool, False for padding, or None
    -> out (batch, n_heads, q_len, head_dim), and lse (batch, n_heads, q_len) if return_lse.
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
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, n_kv_heads, n_rep, q_len, d)   # query heads grouped by their kv head
    kt = k.transpose(-1, -2)[:, :, None]             # (b, n_kv_heads, 1, d, kv_len): shared by the group
    vg = v[:, :, None]                               # (b, n_kv_heads, 1, kv_len, d)
    out = torch.empty((b, n_kv_heads, n_rep, q_len, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, n_kv_heads, n_rep, q_len), dtype=acc_dtype, device=q.device)

    for i0 in range(0, q_len, block_q):              # one tile of queries
        i1 = min(i0 + block_q, q_len)
        qi = qg[..., i0:i1, :]                                       # (b, n_kv, n_rep, bq, d)
        m = torch.full(qi.shape[:-1] + (1,), -math.inf, dtype=acc_dtype, device=q.device)  # running max
        l = torch.zeros_like(m)                                      # running sum
        acc = torch.zeros(qi.shape, dtype=acc_dtype, device=q.device)  # running p @ v
        kv_end = min(kv_len, max(0, offset + i1)) if causal else kv_len   # causal skip

        for j0 in range(0, kv_end, block_k):         # one tile of keys
            j1 = min(j0 + block_k, kv_end)
            keys = None if kv_mask is None else torch.as_tensor(kv_mask, device=q.device)[:, j0:j1]
            if keys is not None and not bool(keys.any()):   # padding in every row: nothing to read
                continue
            s = (qi @ kt[..., j0:j1]) * scale                        # (b, n_kv, n_rep, bq, bk)
            s = s.to(acc_dtype)
            if causal and j1 - 1 > offset + i0:      # the tile crosses the diagonal
                visible = (torch.arange(j0, j1, device=q.device)[None, :]
                           <= torch.arange(offset + i0, offset + i1, device=q.device)[:, None])
                s = torch.where(visible, s, -math.inf)
            if keys is not None and not bool(keys.all()):   # hide the padding
                s = torch.where(keys[:, None, None, None, :], s, -math.inf)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_ref = torch.where(m_new == -math.inf, 0.0, m_new)      # a row with no key yet
            alpha = torch.exp(m - m_ref)                             # rescales what was summed against m
            p = torch.exp(s - m_ref)
            l = alpha * l + p.sum(dim=-1, keepdim=True)
            acc = alpha * acc + p @ vg[..., j0:j1, :].to(acc_dtype)
            m = m_new

        out[..., i0:i1, :] = (acc / torch.where(l == 0, 1.0, l)).to(q.dtype)   # no key seen: 0
        lse[..., i0:i1] = (m + torch.log(l))[..., 0]                 # -inf where l == 0

    out = out.reshape(b, n_heads, q_len, d)
    return (out, lse.reshape(b, n_heads, q_len)) if return_lse else out


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same function through ``torch.nn.functional.scaled_dot_product_attention``.

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len) bool, False for padding, or None -> (batch, n_heads, q_len, head_dim).

    Grouped heads go to the kernel as they are (``enable_gqa=True``), not repeated. SDPA's
    ``is_causal`` aligns the mask top-left (query i sees keys j <= i), which is npllama's
    bottom-right alignment only when q_len == kv_len; that case (prefill) uses ``is_causal`` and
    so torch's flash kernel. A single query after a cache sees every key and needs no mask. Any
    other q_len < kv_len (a chunk after a cache) gets npllama's bottom-right mask explicitly, and so
    does padding; a query that sees no key (SDPA gives NaN there) is set to zeros, as npllama's.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if kv_mask is not None:
        visible = visible_keys(q_len, kv_len, causal, kv_mask, q.device)[:, 0, 0]   # (batch, q_len | 1, kv_len)
        visible = visible.expand(-1, q_len, -1)[:, None]                           # (batch, 1, q_len, kv_len)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        return torch.where(visible.any(-1, keepdim=True), out, 0.0)
    if not causal or (q_len == 1 and kv_len >= 1):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(q_len, kv_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

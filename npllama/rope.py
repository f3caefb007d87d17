"""Rotary position embeddings (Su et al. 2021, "RoFormer"): the rotation of q and k.

A rotary embedding turns the query and key of position m into rotations by the angles
m * theta_i, one angle per pair of channels, so that q_m . k_n depends on m - n only:

    theta_i = base ** (-2i / d)            i in [0, d/2), d = rotary_dim, base = rope_theta
    x'      = x * cos(m theta) + rotate_half(x) * sin(m theta)

Layout. npllama rotates *halves*: channel i pairs with channel i + d/2 (Hugging Face's
``rotate_half``). Meta's reference rotates interleaved pairs (2i, 2i+1); the loaders permute the
rows of wq and wk of Meta and GGUF checkpoints into the half layout (formats/permute.py), so one
rotation serves every format. With ``partial_rotary_factor`` < 1 only the first rotary_dim
channels of each head are rotated; the rest pass through.

Scaled variants (position interpolation, dynamic NTK, Llama 3.1, YaRN) change only the
frequencies theta_i (and, for YaRN, a factor on cos and sin); they live in rope_scaling.py, by name.

Precision. Inverse frequencies and angles are computed in float64, and cos and sin are cast to
the compute dtype at the end: float32 angles lose ~1e-4 in cos by 2K positions. The Torch backend
uses this same float64 table.
"""

from __future__ import annotations

import numpy as np


def default_inv_freq(base: float, dim: int) -> np.ndarray:
    """theta_i = base ** (-2i / dim) for i in [0, dim/2): the RoFormer frequencies (eq. 15). -> (dim//2,)"""
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_cos_sin(inv_freq: np.ndarray, positions: np.ndarray, attention_scaling: float = 1.0,
                 dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The rotation angles m * theta_i as cos and sin, in the half layout, times attention_scaling.

    inv_freq: (rotary_dim // 2,); positions: (..., seq) absolute positions, e.g. (seq,) or one row
    per sequence (batch, seq) -> cos, sin: (..., seq, rotary_dim), each half repeated:
    [cos(m theta_0) .. cos(m theta_{d/2-1}), cos(m theta_0) .. cos(m theta_{d/2-1})].
    """
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq   # (..., seq, rotary_dim // 2)
    angles = np.concatenate([angles, angles], axis=-1)                       # (..., seq, rotary_dim)
    return ((np.cos(angles) * attention_scaling).astype(dtype),
            (np.sin(angles) * attention_scaling).astype(dtype))


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: multiplication by i."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary_emb(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first rotary_dim channels of every head by its position's angles.

    x: (batch, heads, seq, head_dim); cos, sin: (seq, rotary_dim), or (batch, 1, seq, rotary_dim)
    when each sequence has its own positions -> x's shape.
    x_rot * cos + rotate_half(x_rot) * sin is the complex product (x_i + i x_{i+d/2}) e^{i m theta_i}.
    With partial rotary (rotary_dim < head_dim) the remaining channels pass through unchanged.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    if x_pass.shape[-1] == 0:
        return rotated
    return np.concatenate([rotated, x_pass], axis=-1)

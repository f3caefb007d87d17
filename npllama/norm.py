"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis.

    x: (..., dim); weight: (dim,); returns x's shape and dtype.
    eps sits inside the square root (LLaMA-1: 1e-6, Llama 2/3: 1e-5). The statistic is taken in
    at least float32, the result is cast back to x's dtype, and only then multiplied by the weight:
    the order Meta's and transformers' RMSNorm use, which matters in half precision.
    """
    x32 = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    ms = (x32 * x32).sum(axis=-1, keepdims=True) / x.shape[-1]   # mean(x^2): (..., 1)
    normed = (x32 / np.sqrt(ms + eps)).astype(x.dtype, copy=False)
    return normed * weight

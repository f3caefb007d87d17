"""RMSNorm (Zhang & Sennrich 2019), the Torch twin of npllama.norm."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis.

    x: (..., dim); weight: (dim,); returns x's shape and dtype.
    As in npllama.norm.rms_norm: the statistic is taken in at least float32, the normalised x is
    cast back to x's dtype, and only then multiplied by the weight (Meta's and transformers' order).
    """
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    ms = torch.mean(x32 * x32, dim=-1, keepdim=True)   # (..., 1)
    normed = (x32 / torch.sqrt(ms + eps)).to(x.dtype)
    return normed * weight

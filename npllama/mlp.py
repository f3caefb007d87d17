"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T + b, nn.Linear's product.  x: (..., in); w: (out, in); b: (out,) -> (..., out)."""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish (Elfwing et al. 2017): x * sigmoid(x).

    Written with sigmoid(x) = (1 + tanh(x / 2)) / 2, which never overflows (exp(-x) would for
    x < -88 in float32).
    """
    half = x.dtype.type(0.5)
    return x * (half + half * np.tanh(half * x))


def feed_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, b1: np.ndarray | None = None,
                 b2: np.ndarray | None = None, b3: np.ndarray | None = None) -> np.ndarray:
    """out = w2(silu(w1 x) * w3 x)   (Meta's FeedForward; HF: gate_proj = w1, up_proj = w3, down_proj = w2).

    x: (batch, seq, dim); w1, w3: (hidden_dim, dim); w2: (dim, hidden_dim) -> (batch, seq, dim)
    """
    # gate = silu(w1 x) and up = w3 x, (batch, seq, hidden_dim) each, written in one expression so
    # that neither outlives gate * up during the w2 product (npllama.memory counts on it)
    return linear(silu(linear(x, w1, b1)) * linear(x, w3, b3), w2, b2)

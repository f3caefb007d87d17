"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w + b.  x: (..., in); w: (in, out), npllama's layout (the transpose of nn.Linear's)."""
    y = x @ w
    if b is not None:
        y += b
    return y


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: x * sigmoid(x) = x / (1 + exp(-x))."""
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the right 0
        return x / (x.dtype.type(1) + np.exp(-x))


def feed_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray,
                 b1=None, b2=None, b3=None) -> np.ndarray:
    """out = w2(silu(w1 x) * w3 x)   (Meta's FeedForward; HF: gate=w1, up=w3, down=w2).

    x: (batch, seq, dim); w1, w3: (dim, hidden_dim); w2: (hidden_dim, dim) -> (batch, seq, dim)
    """
    gate = silu(linear(x, w1, b1))      # (batch, seq, hidden_dim)
    up = linear(x, w3, b3)              # (batch, seq, hidden_dim)
    return linear(gate * up, w2, b2)    # (batch, seq, dim)

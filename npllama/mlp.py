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
    """SiLU / swish (Elfwing et al. 2017): x * sigmoid(x).

    Written with sigmoid(x) = (1 + tanh(x / 2)) / 2, which never overflows (exp(-x) would for
    x < -88 in float32).
    """
    half = x.dtype.type(0.5)
    return x * (half + half * np.tanh(half * x))


def feed_forward(x: np.ndarray, w13: np.ndarray, w2: np.ndarray,
                 b13: np.ndarray | None = None, b2: np.ndarray | None = None) -> np.ndarray:
    """out = w2(silu(w1 x) * w3 x)   (Meta's FeedForward; HF: gate_proj = w1, up_proj = w3, down_proj = w2).

    x: (batch, seq, dim); w13: (dim, 2 * hidden_dim), w1 and w3 side by side (one product for
    both); w2: (hidden_dim, dim) -> (batch, seq, dim)
    """
    gate_up = linear(x, w13, b13)                           # (batch, seq, 2 * hidden_dim)
    hidden = w2.shape[0]
    gate, up = gate_up[..., :hidden], gate_up[..., hidden:]  # (batch, seq, hidden_dim) each
    return linear(silu(gate) * up, w2, b2)                  # (batch, seq, dim)

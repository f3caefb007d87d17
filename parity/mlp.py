"""The SwiGLU feed-forward block (Shazeer 2020), the Torch twin of npllama.mlp.

Weights keep nn.Linear's (out, in) layout, as npllama's do: ``linear`` is ``F.linear``, so a
checkpoint's tensors are used as they are and autograd sees plain parameters.
A quantized weight (parity.quant, npllama's QuantizedMatrix twin) brings its own kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b.  x: (..., in); w: (out, in), nn.Linear's layout, or a module that computes
    the product itself (its ``linear``): a quantized weight (parity.quant: its int8 / int4
    kernel), a weight left in its file (parity.mapped), a row-parallel slice (parity.tp);
    b: (out,) -> (..., out)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    return w.linear(x, b)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish (Elfwing et al. 2017): x * sigmoid(x).

    F.silu evaluates in float32 inside its kernel for half types and rounds once, and never
    overflows: the same function as npllama's x * (1/2 + tanh(x/2)/2), at least as accurate.
    """
    return F.silu(x)


def feed_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                 b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                 b3: torch.Tensor | None = None) -> torch.Tensor:
    """out = w2(silu(w1 x) * w3 x)   (Meta's FeedForward; HF: gate_proj = w1, up_proj = w3, down_proj = w2).

    x: (batch, seq, dim); w1, w3: (hidden_dim, dim); w2: (dim, hidden_dim) -> (batch, seq, dim)
    """
    return linear(silu(linear(x, w1, b1)) * linear(x, w3, b3), w2, b2)

"""Rotary position embeddings, the Torch twin of npllama.rope.

The variants are *not* written twice. ``ROPE_INIT_FUNCTIONS``, ``register`` and every variant
function are npllama.rope_scaling's own objects, re-exported here, and :func:`rope_init` wraps
npllama's float64 table in a tensor. Why one registry for both backends:

- A variant is a function of the config and the length that yields rotary_dim/2 numbers once per
  forward call; computing them in Torch buys nothing, and a second copy of each formula is a
  second place for it to drift (the table is built one way, in one place).
- A variant registered once with ``npllama.rope_scaling.register`` (or ``parity.rope.register``,
  the same function) runs in both backends, so a plug-in cannot make the two disagree.
- What the backends do compute separately, and what the parity tests compare, is everything
  after the table: the angles, cos and sin, their cast, and the rotation of q and k.

Angles are float64 here as in npllama; cos and sin are cast to the compute dtype at the end.
"""

from __future__ import annotations

import numpy as np
import torch

from npllama.config import ModelArgs
from npllama.rope import default_inv_freq  # noqa: F401
from npllama.rope_scaling import (ROPE_INIT_FUNCTIONS, RopeInit, register, rope_default,  # noqa: F401
                                  rope_dynamic, rope_linear, rope_llama3, rope_param, rope_yarn)
from npllama.rope_scaling import rope_init as _rope_init_table


def rope_init(args: ModelArgs, seq_len: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """npllama's inverse frequencies for the config's variant, as a float64 tensor.

    seq_len: one past the largest position this forward call rotates (cache length + new tokens).
    -> inv_freq: (rotary_dim // 2,) float64, and the attention scaling applied to cos and sin.
    """
    inv_freq, scaling = _rope_init_table(args, seq_len)
    return torch.from_numpy(np.ascontiguousarray(inv_freq)).to(device=device), scaling


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation angles m * theta_i as cos and sin, in the half layout, times attention_scaling.

    inv_freq: (rotary_dim // 2,); positions: (..., seq) absolute positions, e.g. (seq,) or one row
    per sequence (batch, seq) -> cos, sin: (..., seq, rotary_dim) in dtype; angles are float64 and
    cast last, as in npllama.
    """
    positions = torch.as_tensor(positions)
    inv_freq = torch.as_tensor(inv_freq).to(device=positions.device, dtype=torch.float64)
    angles = positions.to(torch.float64)[..., None] * inv_freq     # (..., seq, rotary_dim // 2)
    angles = torch.cat([angles, angles], dim=-1)                     # (..., seq, rotary_dim)
    return ((torch.cos(angles) * attention_scaling).to(dtype),
            (torch.sin(angles) * attention_scaling).to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: multiplication by i."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head by its position's angles.

    x: (batch, heads, seq, head_dim); cos, sin: (seq, rotary_dim), or (batch, 1, seq, rotary_dim)
    when each sequence has its own positions -> x's shape.
    With partial rotary (rotary_dim < head_dim) the remaining channels pass through unchanged.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    if x_pass.shape[-1] == 0:
        return rotated
    return torch.cat([rotated, x_pass], dim=-1)

"""Rotary position embeddings (Su et al. 2021, "RoFormer"), and their scaled variants by name.

Each variant is one function ``(args, seq_len) -> (inv_freq, attention_scaling)`` registered under
its name; the model looks the function up from ``args.rope_scaling["rope_type"]``. Register your
own with::

    @npllama.rope.register("my_variant")
    def my_variant(args, seq_len):
        return inv_freq, 1.0

Layout. npllama rotates *halves*: channel i pairs with channel i + rotary_dim/2 (Hugging Face's
``rotate_half``). Meta's reference rotates interleaved pairs (2i, 2i+1); the loaders permute the
rows of wq and wk of Meta and GGUF checkpoints into the half layout (see ``formats/permute.py``),
so one rotation serves every format.

Precision. Inverse frequencies and angles are computed in float64 here, in one place, and both
backends use this table; cos and sin are cast to the compute dtype at the end.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .config import ModelArgs
from .errors import ConfigError

RopeInit = Callable[[ModelArgs, int], "tuple[np.ndarray, float]"]
ROPE_INIT_FUNCTIONS: dict[str, RopeInit] = {}


def register(name: str) -> Callable[[RopeInit], RopeInit]:
    """Decorator: make ``fn(args, seq_len) -> (inv_freq, attention_scaling)`` a rope variant."""
    def decorate(fn: RopeInit) -> RopeInit:
        ROPE_INIT_FUNCTIONS[name] = fn
        return fn
    return decorate


def rope_init(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Look up the variant named by the config and compute its inverse frequencies.

    seq_len: positions the current forward call reaches (cache + new tokens); only variants that
    depend on the length (dynamic NTK) use it.
    Returns inv_freq: (rotary_dim // 2,) float64, and the attention scaling applied to cos and sin.
    """
    name = args.rope_type
    try:
        fn = ROPE_INIT_FUNCTIONS[name]
    except KeyError:
        known = ", ".join(sorted(ROPE_INIT_FUNCTIONS))
        raise ConfigError(f"unknown rope type {name!r}; known types: {known} "
                          f"(add one with npllama.rope.register)") from None
    inv_freq, scaling = fn(args, seq_len)
    return np.asarray(inv_freq, dtype=np.float64), float(scaling)


def default_inv_freq(base: float, dim: int) -> np.ndarray:
    """theta_i = base ** (-2i / dim) for i in [0, dim/2): the RoFormer frequencies. -> (dim//2,)"""
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


@register("default")
def rope_default(args: ModelArgs, seq_len: int) -> tuple[np.ndarray, float]:
    """Standard RoPE: inv_freq_i = rope_theta ** (-2i / rotary_dim)."""
    return default_inv_freq(args.rope_theta, args.rotary_dim), 1.0


def rope_cos_sin(inv_freq: np.ndarray, positions: np.ndarray, attention_scaling: float = 1.0,
                 dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The rotation angles m * theta_i as cos and sin, in the half layout.

    inv_freq: (rotary_dim // 2,); positions: (seq,) absolute positions
    -> cos, sin: (seq, rotary_dim), each half repeated: [cos(m theta_0..), cos(m theta_0..)].
    """
    angles = np.outer(positions.astype(np.float64), inv_freq)        # (seq, rotary_dim // 2)
    angles = np.concatenate([angles, angles], axis=-1)               # (seq, rotary_dim)
    return ((np.cos(angles) * attention_scaling).astype(dtype),
            (np.sin(angles) * attention_scaling).astype(dtype))


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: multiplication by i."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary_emb(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first rotary_dim channels of every head by its position's angles.

    x: (batch, heads, seq, head_dim); cos, sin: (seq, rotary_dim) -> x's shape.
    With partial rotary (rotary_dim < head_dim) the remaining channels pass through unchanged.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    if x_pass.shape[-1] == 0:
        return rotated
    return np.concatenate([rotated, x_pass], axis=-1)

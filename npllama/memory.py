"""How much memory a batch of generation takes, estimated from the config before any of it is allocated.

One padded batch of ``batch`` rows, each holding ``length`` positions (prompt and answer), holds
at its peak

    the KV cache     n_layers x 2 (k, v) x batch x length x n_kv_heads x head_dim x itemsize
    the logits       batch x length x vocab x 4   (the prefill returns float32 logits at every position)
    activations      batch x length x (3 x hidden_dim + 4 x dim + (n_heads + 2 n_kv_heads) x head_dim) x itemsize
                     (one layer's widest temporaries: w13's output and its SwiGLU product, the
                     residual stream, its norm and the attention output, and the fused q, k, v)

Attention scores are left out: the model switches to blockwise attention where they would be
large (npllama.model.choose_attention). The KV cache grows by doubling, so its capacity is
counted as the cache would grow to hold ``length`` (cache_capacity). The figures are
estimates of the arrays, not of the allocator: the default budget leaves room for the rest.
"""

from __future__ import annotations

import numpy as np

from .config import ModelArgs

DEFAULT_BATCH_MIB = 1024   # `npllama generate --prompts FILE`: one batch's estimate stays within this


def cache_capacity(length: int, window: int, initial: int = 256) -> int:
    """The slots of a KV cache grown to hold ``length`` positions: it starts at min(initial,
    window) and at least doubles each time it grows (npllama.cache.KVCache)."""
    capacity = min(initial, window)
    while capacity < length:
        capacity = max(length, 2 * capacity)
    return capacity


def batch_bytes(args: ModelArgs, batch: int, length: int, dtype=np.float32) -> int:
    """Bytes one generation batch holds at its peak: KV cache, prefill logits and one layer's
    activations (see the module docstring), for ``batch`` rows of ``length`` positions each,
    computed in ``dtype`` (a NumPy dtype, or anything with an integer ``itemsize``, as torch's have)."""
    itemsize = dtype.itemsize if isinstance(getattr(dtype, "itemsize", None), int) else np.dtype(dtype).itemsize
    capacity = cache_capacity(length, args.max_seq_len)
    cache = args.n_layers * 2 * batch * capacity * args.n_kv_heads * args.head_dim * itemsize
    logits = batch * length * args.vocab_size * 4
    width = 3 * args.hidden_dim + 4 * args.dim + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    activations = batch * length * width * itemsize
    return int(cache + logits + activations)

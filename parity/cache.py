"""The key/value cache, the Torch twin of npllama.cache: one buffer per layer, allocated once.

As in gpt-fast, the cache is static: k[layer], v[layer] are (batch, n_kv_heads, max_seq_len,
head_dim) from the start, and each call writes its keys and values at their positions. Nothing
is allocated while decoding, and the buffers never move (what CUDA graphs need). ``length`` is a
host integer, so positions never cost a device sync.
"""

from __future__ import annotations

import torch

from npllama.config import ModelArgs
from npllama.errors import InputError


class KVCache:
    """Keys and values of every layer for the first ``length`` positions of ``batch`` sequences.

    k[layer], v[layer]: (batch, n_kv_heads, max_seq_len, head_dim), zero-filled. Keys are stored
    *after* rotary embedding, so each keeps the rotation it was written with.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.max_seq_len = int(max_seq_len or args.max_seq_len)
        if self.max_seq_len <= 0:
            raise InputError(f"max_seq_len must be positive, got {max_seq_len}")
        self.batch_size = batch_size
        self.length = 0
        shape = (batch_size, args.n_kv_heads, self.max_seq_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]

    @property
    def capacity(self) -> int:
        return self.max_seq_len

    def reserve(self, new_tokens: int) -> None:
        """Check that new_tokens more positions fit, or say why they do not."""
        need = self.length + new_tokens
        if need > self.max_seq_len:
            raise InputError(f"{need} positions exceed the cache's {self.max_seq_len} "
                             f"({self.length} already cached + {new_tokens} new)")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's keys/values after the cached ones; return all of them.

        k, v: (batch, n_kv_heads, seq, head_dim) -> views (batch, n_kv_heads, length + seq, head_dim).
        ``length`` itself advances in ``advance`` once every layer has written.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (used by chat to drop or rewind turns)."""
        if not 0 <= length <= self.length:
            raise InputError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

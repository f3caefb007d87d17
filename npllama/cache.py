"""The key/value cache: what decoding remembers of the positions it has already seen."""

from __future__ import annotations

import numpy as np

from .config import ModelArgs
from .errors import InputError


class KVCache:
    """Keys and values of every layer for the first ``length`` positions of ``batch`` sequences.

    k[layer], v[layer]: (batch, n_kv_heads, capacity, head_dim). Keys are stored *after* rotary
    embedding, so each keeps the rotation it was written with. Capacity grows by doubling up to
    max_seq_len, so decoding does not allocate per token.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int | None = None,
                 dtype=np.float32, initial_capacity: int = 256):
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.max_seq_len = int(max_seq_len or args.max_seq_len)
        self.batch_size = batch_size
        self.length = 0
        self._shape = (batch_size, args.n_kv_heads, 0, args.head_dim)
        self._dtype = dtype
        cap = min(initial_capacity, self.max_seq_len)
        self.k = [self._alloc(cap) for _ in range(args.n_layers)]
        self.v = [self._alloc(cap) for _ in range(args.n_layers)]

    def _alloc(self, capacity: int) -> np.ndarray:
        b, h, _, d = self._shape
        return np.zeros((b, h, capacity, d), dtype=self._dtype)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, new_tokens: int) -> None:
        """Make room for new_tokens more positions, or say why there is none."""
        need = self.length + new_tokens
        if need > self.max_seq_len:
            raise InputError(f"{need} positions exceed the context window of {self.max_seq_len} "
                             f"({self.length} already cached + {new_tokens} new)")
        if need > self.capacity:
            cap = min(max(need, 2 * self.capacity), self.max_seq_len)
            for store in (self.k, self.v):
                for i, old in enumerate(store):
                    new = self._alloc(cap)
                    new[:, :, : self.length] = old[:, :, : self.length]
                    store[i] = new

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

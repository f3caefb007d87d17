"""The key/value cache, the Torch twin of npllama.cache: one buffer per layer, allocated once.

As in gpt-fast, the cache is static: k[layer], v[layer] are (batch, n_kv_heads, slots, head_dim)
from the start, and each call writes its keys and values at their slots. Nothing is allocated
while decoding, and the buffers never move (what CUDA graphs need). ``length`` is a host integer,
so positions never cost a device sync. As in npllama, the cache keeps which slots hold real
tokens (``mask``) and how many real tokens each row holds (``positions``), on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from npllama.config import ModelArgs
from npllama.checks import is_int
from npllama.errors import InputError
from npllama.rope_scaling import context_window


class KVCache:
    """Keys and values of every layer for the first ``length`` slots of ``batch`` sequences.

    k[layer], v[layer]: (batch, n_kv_heads, slots, head_dim), zero-filled. Keys are stored *after*
    rotary embedding, so each keeps the rotation it was written with. max_seq_len bounds each row's
    real tokens (as npllama.cache.KVCache); slots (default max_seq_len) the columns, padding included.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 slots: int | None = None):
        if not is_int(batch_size) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_seq_len = int(context_window(args) if max_seq_len is None else max_seq_len)
        if self.max_seq_len <= 0:
            raise InputError(f"max_seq_len must be positive, got {max_seq_len}")
        self.slots = int(slots or self.max_seq_len)
        self.batch_size = batch_size
        self.length = 0
        shape = (batch_size, args.n_kv_heads, self.slots, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self._mask = np.zeros((batch_size, self.slots), dtype=bool)     # (batch, slots), on the host
        self.positions = np.zeros(batch_size, dtype=np.int64)           # (batch,)
        self.padded = False
        self._pending: tuple[np.ndarray, bool] | None = None

    @property
    def capacity(self) -> int:
        return self.slots

    @property
    def mask(self) -> np.ndarray:
        """(batch, length): True where a slot holds a real token."""
        return self._mask[:, : self.length]

    def start(self, new_mask: np.ndarray) -> np.ndarray:
        """Note a call's new columns (new_mask: (batch, seq) bool) and return their rotary positions
        (batch, seq), as npllama.cache.KVCache.start; nothing counts as cached until advance."""
        counts = np.cumsum(new_mask, axis=1)
        total = self.positions + counts[:, -1]
        if (total > self.max_seq_len).any():
            row = int(np.argmax(total > self.max_seq_len))
            raise InputError(f"{int(total[row])} positions exceed the cache's {self.max_seq_len} "
                             f"({int(self.positions[row])} already cached + {int(counts[row, -1])} new)")
        seq = new_mask.shape[1]
        if self.length + seq > self.slots:
            raise InputError(f"{self.length + seq} columns exceed the cache's {self.slots} slots "
                             f"({self.length} already cached + {seq} new)")
        self._mask[:, self.length: self.length + seq] = new_mask
        self._pending = (total, not new_mask.all())
        return self.positions[:, None] + counts - new_mask

    def kv_mask(self, seq: int) -> np.ndarray:
        """(batch, length + seq): which slots the queries of the current call may attend to."""
        return self._mask[:, : self.length + seq]

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
        """The current call's n columns are written in every layer: count them as cached."""
        if self._pending is not None:
            self.positions, padded = self._pending
            self.padded = self.padded or padded
            self._pending = None
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (used by chat to drop or rewind turns)."""
        if not 0 <= length <= self.length:
            raise InputError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.positions -= self._mask[:, length: self.length].sum(axis=1)
        self.length = length
